"""The command line: ``shmdirty migrate | inspect NAME | ls | gc``.

``migrate`` is a live migration over TCP (``workers.app``): a KVM guest
where /dev/kvm works (``--guest auto``), else simulated vCPU processes;
``receive`` is its destination.  Exit codes: 0 identical (and, for KVM,
resumed to the expected end), 1 different, 2 bad usage or not a map, 3 a
worker failed, 4 the destination was lost before the handover, 5 (receive)
the stream was refused or broke, 7 (receive) this host cannot hold the
guest, 8 (receive) the resumed guest failed, 128 + signal number when interrupted
(130 Ctrl-C, 143 SIGTERM), after stopping the workers and removing every
segment.

The command line lives beside the application in the repository's
``workers/`` folder, installed as ``shmdirty.workers`` (the console script
is ``shmdirty.workers.cli:main``).

``inspect``, ``ls`` and ``gc`` only look, except ``gc --yes``; they are
``workers.maps_cli`` (why they attach nothing, or only briefly, is there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

from rich.console import Console

from shmdirty import atomic
from shmdirty.maps import CLIENT_NAMES, inspect_map, map_status

# The application: the command line reaches it through this one import.
from . import app, receiver, transport
from .lifecycle import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
)
from .maps_cli import cmd_gc, cmd_inspect, cmd_ls
from .options import (
    MAX_MIGRATE_NAME,
    count,
    fraction,
    map_arg,
    migrate_name_arg,
    non_negative,
    page_size_arg,
    parse_schedule,
    positive,
    positive_whole,
    whole,
    writable_file,
)
from .receive_service import REASONS
from .receiver import Limits
from .render import Progress, error, say, summary
from .reports import Abandoned, BlocksReady, DestinationReport, Resumed

PEER_TIMEOUT = 5.0       # workers.peer.DEFAULT_PEER_TIMEOUT (cli imports only workers.app)
PEER_TIMEOUT_HELP = ("seconds of silence (no byte, no heartbeat, nothing taken) after which "
                     "the peer is lost: hung, dead or unreachable (default 5)")
MIGRATE_EXITS = """\
exit codes:
  0        identical (kvm: and the guest resumed to its expected end)
  1        they differ (the summary names the first differing pages)
  2        bad options, or the map cannot be made (nothing was started)
  3        a worker failed, or --json / --plot could not be written
  4        the destination was lost before the commit: the source guest runs on
  6        the run took longer than --timeout
  7        the guest's fate is UNKNOWN: RESUME sent, then the destination fell
           silent before RUNNING; the source's copy was discarded (never two)
  8        the destination committed (ran the guest), then was lost
  130/143  interrupted by Ctrl-C / SIGTERM: workers stopped, every segment removed
--json is written on every exit but 2: exit_code, and guest_on (source,
destination, unknown, none) says which side holds the guest."""
RECEIVE_EXITS = """\
exit codes:
  0    received, resumed, and the guest ran to its end
  2    bad options, unreadable --tls-creds, or the address cannot be listened on
  5    the stream was refused or broke: not TLS or not authorized, malformed
       (not the format of docs/STREAM.md), truncated, or the source went away
       or fell silent before the commit (--peer-timeout)
  9    this host cannot hold the guest: KVM or memory failed, or more RAM
       than --max-ram
  10   the resumed guest did not run to its end (a vCPU fault such as HLT,
       or --guest-timeout)
  130  interrupted by Ctrl-C (143: SIGTERM)
Without --once, a connection refused for 5 or 9 is logged on stderr as one line
`receive: refused (code N, ...)` and the receiver listens on: it ends after one
migration resumed its guest."""
INSPECT_EXITS = """\
exit codes:
  0    shown
  2    bad options, or NAME is not a readable map (the reason goes to stderr)
  130  interrupted by Ctrl-C"""
LS_EXITS = """\
exit codes:
  0    listed (also when there is no map)
  2    bad options
  130  interrupted by Ctrl-C"""
GC_EXITS = """\
exit codes:
  0    listed or removed (maps that are in use are left alone and named)
  2    bad options, or a NAME is not a map (the others are still handled)
  130  interrupted by Ctrl-C"""

__all__ = ["CLIENT_NAMES", "inspect_map", "main", "map_status"]


def endpoint(text: str) -> transport.Endpoint:
    """``HOST:PORT`` or ``unix:PATH``."""
    try:
        return transport.parse_endpoint(text)
    except transport.TransportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def creds_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


def _to(ep: transport.Endpoint | None) -> tuple[str, int] | None:
    """``--to`` as the run's (host, port): a Unix socket is ("unix:PATH", 0)."""
    if ep is None:
        return None
    return (f"{transport.UNIX}{ep.path}", 0) if ep.path is not None else (ep.host, ep.port)


# Options only one guest uses: given for the other, they are refused up front.
ONLY_FOR = {"steps": "kvm", "dataplane_rate": "kvm", "dirty_rate": "sim"}


def _migrate_config(args: argparse.Namespace, guest: str, why: str) -> app.MigrateConfig:
    """The options, with each guest's own defaults where none was given;
    Usage for an option the chosen guest would ignore, and for --plot
    without matplotlib (refused before the run, not after it)."""
    kvm = guest == "kvm"
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (only asked whether it imports)
        except ImportError as e:
            raise app.Usage(f"--plot needs matplotlib, which cannot be imported ({e}); "
                            "install it with: pip install 'shmdirty[bench]'") from None
    if args.tls_creds is not None and args.to is None:
        raise app.Usage("--tls-creds protects the stream to a receiver elsewhere: give --to "
                        "too (the loopback receiver is this run's own child)")
    for name, only in ONLY_FOR.items():
        if getattr(args, name) is not None and guest != only:
            raise app.Usage(f"--{name.replace('_', '-')} applies to --guest {only} only "
                            f"(this run: --guest {guest})")
    if args.hot_fraction is not None and args.pattern != "hot":
        raise app.Usage("--hot-fraction applies to --pattern hot only")
    return app.MigrateConfig(
        ram=args.ram or ((128 if kvm else 64) << 20), vcpus=args.vcpus,
        dirty_rate=2000 if args.dirty_rate is None else args.dirty_rate,
        # one set of pattern names: random is uniform, for either guest
        pattern="uniform" if args.pattern == "random" else args.pattern,
        hot_fraction=0.05 if args.hot_fraction is None else args.hot_fraction,
        dirty_mode=args.dirty_mode,
        hotplug=args.hotplug if args.hotplug is not None else ((1.0, (64 if kvm else 32) << 20),),
        block_pages=args.block_pages or ((1 << 15) if kvm else 4096),
        bandwidth=args.bandwidth if args.bandwidth is not None else (0.0 if kvm else 24.0),
        threshold=args.threshold if args.threshold is not None else (512 if kvm else 256),
        max_rounds=args.max_rounds, seed=args.seed, timeout=args.timeout,
        drop_round=args.drop_round, name=args.name, guest=guest, guest_why=why, to=_to(args.to),
        steps=args.steps or 0,
        dataplane_rate=1000 if args.dataplane_rate is None else args.dataplane_rate,
        dataplane_forget=args.dataplane_forget, kill_destination_at=args.kill_destination_at,
        peer_timeout=args.peer_timeout, tls_creds=args.tls_creds)


def _write_outputs(args: argparse.Namespace, res: dict[str, Any], out: Console) -> bool:
    """Write --json / --plot (their paths were checked up front); False if
    one could not be written after all (a race, a full disk)."""
    try:
        if args.json:
            text = json.dumps(res, indent=2, default=str)  # whole before the file is touched
            with open(args.json, "w") as f:
                f.write(text)
        if args.plot and res.get("round_log") is not None and res.get("downtime"):
            app.plot_rounds(res, args.plot)
            out.print(f"plot: {args.plot}", highlight=False)
    except OSError as e:
        error(out, f"could not write {e.filename or 'the results'}: {e.strerror or e}")
        return False
    return True


def _write_failure(args: argparse.Namespace, e: app.RunError, code: int, out: Console) -> None:
    """--json for a run that ended early: its code, and which side holds the guest."""
    _write_outputs(args, {"exit_code": code, "outcome": type(e).__name__, "error": str(e),
                          "guest_on": e.guest_on, "map": e.map_name}, out)


def cmd_migrate(args: argparse.Namespace, out: Console) -> int:
    try:
        cfg = _migrate_config(args, *app.choose_guest(args.guest))
    except app.Usage as e:
        error(out, str(e))
        return EXIT_USAGE
    progress = Progress(cfg, out)
    try:
        try:
            res = app.run(cfg, progress)
        finally:
            progress.close()
    except app.Interrupted as e:
        error(out, f"interrupted by {e}: workers stopped, map {e.map_name} removed "
                   f"({e.removed} segments)")
        _write_failure(args, e, 128 + e.signum, out)
        return 128 + e.signum
    except app.DestinationGone as e:
        error(out, f"migration FAILED: {e}")
        src = e.result.get("source_ok")
        if src is not None:
            out.print(f"the source guest ran on to its end: "
                      f"{'as the model says' if src else 'NOT as the model says'}",
                      highlight=False, soft_wrap=True)
        _write_outputs(args, e.result, out)
        return e.exit_code
    except app.TimedOut as e:
        error(out, f"{e}\nmap {e.map_name} removed ({e.removed} segments)")
        _write_failure(args, e, EXIT_TIMEOUT, out)
        return EXIT_TIMEOUT
    except app.Failed as e:
        error(out, f"{e}\nmap {e.map_name} removed ({e.removed} segments)")
        _write_failure(args, e, EXIT_FAILED, out)
        return EXIT_FAILED
    except app.Usage as e:
        error(out, str(e))
        return EXIT_USAGE
    ok = res["identical"] and res["resumed_ok"] is not False
    res["exit_code"] = code = EXIT_OK if ok else EXIT_MISMATCH
    try:
        summary(res, out)
    except KeyboardInterrupt:     # the run is done: its result, with the code of the exit
        res["exit_code"] = EXIT_INTERRUPTED
        _write_outputs(args, res, out)
        raise
    if not _write_outputs(args, res, out):
        return EXIT_FAILED
    return code


def cmd_receive(args: argparse.Namespace, out: Console) -> int:
    def progress(ev: DestinationReport) -> None:
        if isinstance(ev, BlocksReady):
            say(out, f"receive: blocks {list(ev.blocks)}")
        elif isinstance(ev, Resumed):
            say(out, f"receive: resumed {ev.vcpus}")
        elif isinstance(ev, Abandoned):
            say(out, "receive: abandoned ")

    def refused(code: int, peer: str, reason: str) -> None:
        error(out, f"receive: refused (code {code}, {REASONS[code]}) {peer}: {reason}; "
                   "still listening")

    ep, tls = args.listen, args.tls_creds is not None
    if args.tls_authz and not tls:
        error(out, "receive: --tls-authz needs --tls-creds")
        return EXIT_USAGE
    if transport.needs_insecure(ep, tls):
        if not args.insecure:
            error(out, f"receive: {ep} is reachable from other machines and the stream is "
                       "not encrypted: give --tls-creds DIR, or --insecure to allow it")
            return EXIT_USAGE
        error(out, f"receive: WARNING: listening on {ep} without TLS (--insecure): anyone "
                   "who reaches it can push a guest, and guest RAM crosses the network in clear")
    cfg = app.ServiceConfig(ep, args.tls_creds, transport.parse_authz(args.tls_authz or ()),
                            Limits(max_ram=args.max_ram,
                                   handshake_timeout=args.handshake_timeout,
                                   peer_timeout=args.peer_timeout,
                                   guest_timeout=args.guest_timeout), once=args.once)
    try:
        res = app.receive(cfg, progress,
                          lambda addr: say(out, f"receive: listening on {addr}"
                                           + (" (TLS)" if tls else "")), refused)
    except app.StreamRefused as e:
        error(out, f"receive: {e}; nothing was left behind")
        return e.code
    except app.Usage as e:
        error(out, f"receive: {e}")
        return EXIT_USAGE
    except OSError as e:
        error(out, f"receive: cannot listen on {ep}: {e.strerror or e}")
        return EXIT_USAGE
    except app.Interrupted as e:
        out.print(f"receive: interrupted by {e}; nothing was left behind")
        return 128 + e.signum
    say(out, f"receive: {res['pages']} pages loaded; guest "
              + ("resumed and finished" if res.get("resumed") else "not resumed"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
    return EXIT_OK


# --- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmdirty",
        description="QEMU's RCU dirty-memory bitmap in POSIX shared memory: a live "
                    "migration demo and tools to look at maps.",
        epilog="Each command lists its exit codes in its --help.  Bad options exit 2.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    m = sub.add_parser("migrate", help="run a live migration with RAM hot-add, check it "
                       "byte for byte", description="vCPU processes dirty guest RAM while a "
                       "migrator pre-copies it round by round and RAM is hot-added; then "
                       "stop-and-copy, then the destination is compared with the source.",
                       epilog=MIGRATE_EXITS, formatter_class=raw)
    m.add_argument("--guest", choices=("auto", "kvm", "sim"), default="auto",
                   help="kvm: a real KVM guest; sim: simulated vCPU processes; auto (default): "
                        "kvm where /dev/kvm works")
    m.add_argument("--to", type=endpoint, default=None, metavar="HOST:PORT|unix:PATH",
                   help="send to a `shmdirty receive` there (default: start one on loopback)")
    m.add_argument("--tls-creds", type=creds_dir, default=None, metavar="DIR",
                   help="TLS 1.3 with both ends verified, as QEMU's tls-creds-x509 "
                        "verify-peer=on: DIR holds ca-cert.pem, client-cert.pem, client-key.pem "
                        "(and server-cert.pem, server-key.pem for the loopback receiver)")
    m.add_argument("--ram", type=page_size_arg, default=None, metavar="SIZE",
                   help="initial guest RAM, a positive size like 512K, 64M, 1G "
                        "(default 128M kvm, 64M sim)")
    m.add_argument("--steps", type=count, default=None, metavar="N",
                   help="kvm: guest steps per vCPU (default: the pattern's)")
    m.add_argument("--dataplane-rate", type=non_negative, default=None, metavar="N",
                   help="kvm: dataplane writes per second, 0 = no dataplane (default 1000)")
    m.add_argument("--plot", type=writable_file, metavar="PATH",
                   help="write a PNG of dirty and sent pages per round to PATH")
    m.add_argument("--vcpus", type=positive_whole, default=2, metavar="N", help="vCPU processes "
                   "(default 2)")
    m.add_argument("--dirty-rate", type=non_negative, default=None, metavar="PAGES",
                   help="pages each vCPU writes per second (default 2000)")
    m.add_argument("--pattern", choices=("uniform", "random", "hot", "sequential"),
                   default="uniform", help="where vCPUs write (default uniform = random)")
    m.add_argument("--hot-fraction", type=fraction, default=None, metavar="F",
                   help="hot pattern: share of RAM in each vCPU's hot set (default 0.05)")
    m.add_argument("--dirty-mode", choices=("flag", "lebitmap"), default="flag",
                   help="flag: set_dirty_flag per page; lebitmap: KVM-style bitmaps merged "
                        "with set_dirty_lebitmap (default flag)")
    m.add_argument("--hotplug", type=parse_schedule, default=None, metavar="SCHEDULE",
                   help="RAM hot-adds as AT:SIZE[,...] or 'none'; AT is seconds after the start "
                   "(sim) or percent of the guest's steps (kvm) (default 1:32M sim, 1:64M kvm)")
    m.add_argument("--block-pages", type=positive_whole, default=0, metavar="N",
                   help="pages per dirty-bitmap block (default 4096 sim, 32768 kvm; QEMU "
                        "uses 2097152)")
    m.add_argument("--bandwidth", type=non_negative, default=None, metavar="MIB",
                   help="pre-copy bandwidth in MiB/s, 0 = unlimited (default 24 sim, 0 kvm)")
    m.add_argument("--threshold", type=count, default=None, metavar="PAGES",
                   help="pre-copy ends when at most this many pages are dirty (default 256 "
                        "sim, 512 kvm)")
    m.add_argument("--max-rounds", type=positive_whole, default=30, metavar="N",
                   help="pre-copy rounds at most (default 30)")
    m.add_argument("--seed", type=whole, default=1, help="random seed of the vCPUs (default 1)")
    m.add_argument("--json", type=writable_file, metavar="PATH",
                   help="write the results as JSON to PATH")
    m.add_argument("--name", type=migrate_name_arg, default=None,
                   help=f"map name, at most {MAX_MIGRATE_NAME} characters (default: random)")
    m.add_argument("--timeout", type=positive, default=300.0, metavar="SECONDS",
                   help="give up after this long (default 300)")
    m.add_argument("--peer-timeout", type=positive, default=PEER_TIMEOUT, metavar="S",
                   help=PEER_TIMEOUT_HELP)
    # Testing: the migrator forgets the dirty pages of this round, so the
    # final comparison must fail.
    m.add_argument("--drop-round", type=count, default=0, help=argparse.SUPPRESS)
    # Testing (kvm): a dataplane that forgets to mark; the receiver killed at round N.
    m.add_argument("--dataplane-forget", action="store_true", help=argparse.SUPPRESS)
    m.add_argument("--kill-destination-at", type=count, default=0, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_migrate)

    r = sub.add_parser("receive", help="the destination of `migrate --to`: receive one "
                       "migration, resume the guest", description="Listen on HOST:PORT for one "
                       "migration stream (docs/STREAM.md), build the guest's RAM (and VM) "
                       "here, resume it to its end, then exit.", epilog=RECEIVE_EXITS,
                       formatter_class=raw)
    r.add_argument("--listen", type=endpoint, required=True, metavar="HOST:PORT|unix:PATH",
                   help="where to listen: TCP, or a Unix socket created mode 0600 (a "
                        "non-loopback address without --tls-creds needs --insecure)")
    r.add_argument("--tls-creds", type=creds_dir, default=None, metavar="DIR",
                   help="TLS 1.3 with both ends verified, as QEMU's tls-creds-x509 "
                        "verify-peer=on: DIR holds ca-cert.pem, server-cert.pem, server-key.pem")
    r.add_argument("--tls-authz", action="append", metavar="SUBJECT[,...]",
                   help="only clients whose certificate's common name is listed (or whose "
                        "whole subject is the given CN=..,O=..); may be repeated")
    r.add_argument("--insecure", action="store_true",
                   help="allow a plain TCP listener on a non-loopback address (one warning)")
    r.add_argument("--max-ram", type=page_size_arg, default=0, metavar="SIZE",
                   help="refuse guests with more RAM (default: this host's available "
                        "memory when the guest arrives; guest RAM is in memfds)")
    r.add_argument("--handshake-timeout", type=positive, default=receiver.HANDSHAKE_TIMEOUT,
                   metavar="SECONDS", help="from the accept to the stream's HELLO, TLS "
                   f"included (default {receiver.HANDSHAKE_TIMEOUT:g})")
    r.add_argument("--guest-timeout", type=positive, default=receiver.GUEST_TIMEOUT,
                   metavar="SECONDS", help="the resumed guest's run at most (default "
                   f"{receiver.GUEST_TIMEOUT:g})")
    r.add_argument("--once", action="store_true",
                   help="end after the first connection, whatever becomes of it")
    r.add_argument("--json", type=writable_file, metavar="PATH",
                   help="write the result as JSON to PATH")
    r.add_argument("--peer-timeout", type=positive, default=PEER_TIMEOUT, metavar="S",
                   help=PEER_TIMEOUT_HELP)
    r.set_defaults(func=cmd_receive)

    i = sub.add_parser("inspect", help="show a map: header, RAM, dirty counts, reader slots",
                       epilog=INSPECT_EXITS, formatter_class=raw)
    i.add_argument("name", type=map_arg, metavar="NAME", help="map name (see `shmdirty ls`)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)

    ls = sub.add_parser("ls", help="list live maps", epilog=LS_EXITS, formatter_class=raw)
    ls.add_argument("-a", "--all", action="store_true", help="also dead and unreadable maps")
    ls.set_defaults(func=cmd_ls)

    g = sub.add_parser("gc", help="remove segments of maps whose processes are all dead",
                       epilog=GC_EXITS, formatter_class=raw)
    g.add_argument("names", nargs="*", type=map_arg, metavar="NAME",
                   help="only these maps (default: every map)")
    g.add_argument("--yes", action="store_true", help="remove them (default: only list)")
    g.set_defaults(func=cmd_gc)
    return p


def version() -> str:
    try:
        return _dist_version("shmdirty")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


_NEGATIVE = re.compile(r"-\.?\d")


def _negatives_attached(argv: Sequence[str]) -> list[str]:
    """``--ram -5M`` -> ``--ram=-5M``: argparse takes a value that starts
    with ``-`` and is not a plain number (``-5M``, ``-1:4M``) for an option
    and says "expected one argument"; attached, the option's own check says
    in plain words what is wrong with it."""
    out: list[str] = []
    for tok in argv:
        if (out and out[-1].startswith("--") and "=" not in out[-1]
                and _NEGATIVE.match(tok)):
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


@contextlib.contextmanager
def _workers_on_this_backend() -> Iterator[None]:
    """While a command runs, the processes it spawns use this process's
    atomics backend (SHMDIRTY_ATOMICS, as ``python -m perf`` does): the same
    ops everywhere, and an install without the kernel warns once, here, not
    again in every worker (issue 11).  The variable is restored after."""
    before = os.environ.get("SHMDIRTY_ATOMICS")
    os.environ["SHMDIRTY_ATOMICS"] = atomic.backend.name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SHMDIRTY_ATOMICS", None)
        else:
            os.environ["SHMDIRTY_ATOMICS"] = before


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (each command's --help
    lists them).  Ctrl-C at any point exits 130 without a traceback; during a
    migration the run stops its workers and removes its segments first."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(_negatives_attached(sys.argv[1:] if argv is None
                                                         else argv))
        except SystemExit as e:  # --help, or a usage error (argparse printed it)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        # Logs and pipes get a wide console (COLUMNS still wins).
        wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140
        out = Console(highlight=False, width=wide)
        with _workers_on_this_backend():
            code: int = args.func(args, out)
        return code
    except KeyboardInterrupt:
        error(Console(stderr=True), "interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
