"""The command line's ``inspect``, ``ls`` and ``gc``: the commands that only
look at maps (``shmdirty.maps``), never at the migrate application.

``ls`` and ``gc`` never attach a map: they read the header's owner words
directly, so they claim no reader slot and block nobody.  ``inspect``
attaches (a reader slot) only for as long as it takes to count dirty pages.
``gc`` removes segments only with ``--yes``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from shmdirty import ShmDirtyError, layout, segment
from shmdirty.maps import MapStatus, collect, inspect_map, map_status

from .lifecycle import EXIT_OK, EXIT_USAGE
from .options import natural
from .render import error, fmt_bytes, say


def _render_inspect(info: dict[str, Any], out: Console) -> None:
    name = info["map"]
    out.print(f"[bold]map {name}[/bold] — {info['state']}", highlight=False)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="cyan", no_wrap=True)
    grid.add_column()
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(info["segment_kinds"].items()))
    if "page_bits" not in info:
        grid.add_row("status", info.get("why", ""))
        grid.add_row("segments", f"{len(info['segments'])} in {segment.SHM_DIR} ({kinds})")
        out.print(grid)
        return
    coord = info["coordinator"]
    ps = info["page_size"]
    grid.add_row("header", f"{layout.header_name(name)}, layout version "
                           f"{info['layout_version']}, {info['max_readers']} reader slots")
    grid.add_row("coordinator", f"pid {coord['pid']}, {'alive' if coord['alive'] else 'DEAD'}"
                 if coord["pid"] else "none (it left; DirtyMemory.adopt() can take over)")
    grid.add_row("pages", f"{fmt_bytes(ps)} (page_bits {info['page_bits']}); bitmap blocks of "
                          f"{info['block_pages']} pages ({fmt_bytes(info['block_pages'] * ps)} "
                          f"of RAM each); tcg {'yes' if info['tcg'] else 'no'}")
    grid.add_row("generation", f"{info['generation']} (grace-period counter "
                               f"{info['grace_period_counter']})")
    ram = info["ram_size"]
    blocks = info.get("ram_blocks")
    where = (" in " + str(len(blocks)) + " block(s): " + " ".join(
        f"[{o:#x}, +{fmt_bytes(s)})" for o, s in blocks)) if blocks is not None else ""
    grid.add_row("RAM", f"{fmt_bytes(ram)} ({ram // ps} pages){where}")
    if "bitmap_blocks" in info:
        grid.add_row("bitmap", f"{info['bitmap_blocks']} block(s) per client")
        grid.add_row("dirty pages", ", ".join(f"{k} {v}" for k, v in info["dirty_pages"].items()))
    else:
        grid.add_row("dirty pages", f"unavailable: {info.get('table_error', '')}")
    req = info["request"]
    grid.add_row("requests", "none pending" if req <= ram else f"RAM size {fmt_bytes(req)} "
                 "requested, not granted yet")
    grid.add_row("segments", f"{len(info['segments'])} in {segment.SHM_DIR} ({kinds})")
    out.print(grid)
    readers = info["readers"]
    table = Table(title=f"reader slots: {len(readers)} claimed of {info['max_readers']}",
                  title_justify="left")
    for col in ("slot", "pid", "alive", "epoch / counter"):
        table.add_column(col, no_wrap=True)
    for r in readers:
        epoch = "0 (outside a section)" if not r["epoch"] else f"{r['epoch']} (in a section)"
        table.add_row(str(r["slot"]), str(r["pid"]), "yes" if r["alive"] else "DEAD", epoch)
    out.print(table)


def cmd_inspect(args: argparse.Namespace, out: Console) -> int:
    try:
        info = inspect_map(args.name)
    except (LookupError, ShmDirtyError) as e:
        error(out, str(e))
        return EXIT_USAGE
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _render_inspect(info, out)
    return EXIT_OK


# --- ls and gc ------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, out: Console) -> int:
    statuses = [map_status(m) for m in sorted(segment.list_maps(), key=natural)]
    shown = [s for s in statuses if args.all or s.state == "live"]
    if not shown:
        say(out, "no live shmdirty maps" if not args.all else "no shmdirty maps")
        return EXIT_OK
    table = Table(box=None, pad_edge=False)
    table.add_column("map", no_wrap=True, min_width=max(len(s.name) for s in shown))
    for col in ("state", "coordinator", "readers", "RAM", "generation", "segments"):
        table.add_column(col, no_wrap=True)
    table.add_column("why", overflow="fold")
    for s in shown:
        alive = sum(r.alive for r in s.readers)
        coord = (f"pid {s.coordinator_pid}" + ("" if s.coordinator_alive else " (dead)")
                 if s.coordinator_pid else "-")
        table.add_row(s.name, s.state, coord, f"{alive}/{len(s.readers)} alive",
                      fmt_bytes(s.ram_size) if s.max_readers else "-",
                      str(s.generation) if s.max_readers else "-", str(len(s.segments)),
                      "" if s.state == "live" else s.why)
    out.print(table)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, out: Console) -> int:
    names = args.names or sorted(segment.list_maps(), key=natural)
    code = EXIT_OK
    garbage: list[MapStatus] = []
    for name in names:
        st = map_status(name)
        if st.state == "absent":
            if args.names:  # (a map that vanished since list_maps() is no error)
                error(out, f"{name!r} is not a map: no shmdirty-{name}-* segment in "
                            f"{segment.SHM_DIR}")
                code = EXIT_USAGE
        elif st.garbage:
            garbage.append(st)
        elif args.names or st.state != "live":
            say(out, f"map {name}: {st.state}" + (f" ({st.why})" if st.why else "")
                 + "; left alone")
    if not garbage:
        say(out, "nothing to collect")
        return code
    total = sum(len(s.segments) for s in garbage)
    say(out, f"{len(garbage)} dead map(s), {total} segment(s):")
    for st in garbage:
        say(out, f"  {st.name}: {st.why}")
        for n in sorted(st.segments, key=natural):
            say(out, f"    {n}")
    if not args.yes:
        say(out, "run `shmdirty gc --yes` to remove them")
        return code
    removed = 0
    for st in garbage:
        again, gone = collect(st.name)
        if not again.garbage:
            say(out, f"map {st.name} is {again.state} now; left alone")
        removed += gone
    say(out, f"removed {removed} segment(s)")
    return code
