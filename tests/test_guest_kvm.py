"""The guest program: embedded bytes = guest_kvm.S assembled; the VM agrees
with the numpy model on every pattern, hot-add included; bad configs refused."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvm_skip import needs_binutils, needs_kvm

import shmdirty as sd
from shmdirty.workers import guest_kvm as g
from shmdirty.workers.guest_model import expected

SOURCE = Path(g.__file__).with_name("guest_kvm.S")


@needs_binutils
def test_embedded_bytes_are_the_assembled_source(tmp_path: Path) -> None:
    obj, binary = tmp_path / "guest.o", tmp_path / "guest.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(SOURCE)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)],
                   check=True)
    assert binary.read_bytes() == g.CODE
    symbols = dict(line.split()[::-2] for line in
                   subprocess.check_output(["nm", str(obj)], text=True).splitlines())
    assert int(symbols["done"], 16) == g.DONE - g.CODE_ADDR


@pytest.mark.parametrize("bad, match", [
    (dict(pattern="stride"), "pattern"),
    (dict(vcpus=0), "vCPUs"),
    (dict(ram=3 << 20), "multiple of 2 MiB"),
    (dict(steps=100, hotplug=((100, 2 << 20),)), "hot-add steps"),
    (dict(steps=100, hotplug=((50, 2 << 20), (40, 2 << 20))), "hot-add steps"),
    (dict(steps=100, hotplug=((50, 3 << 20),)), "hot-add size"),
    (dict(ram=4 << 20, dataplane_pages=800), "no pages"),
])
def test_bad_configs_are_refused(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        g.GuestConfig(**bad)  # type: ignore[arg-type]


def test_config_round_trips_through_json() -> None:
    cfg = g.GuestConfig(ram=8 << 20, pattern="hot", steps=1000, hotplug=((10, 4 << 20),))
    assert g.GuestConfig.from_json(cfg.to_json()) == cfg


def test_regions_split_each_block_between_vcpus() -> None:
    cfg = g.GuestConfig(ram=8 << 20, vcpus=2, steps=100, dataplane_pages=16,
                        hotplug=((10, 4 << 20),))
    r0, r1 = cfg.regions(0, 1), cfg.regions(1, 1)
    first = (g.RESERVED >> 12) + 16
    part = (2048 - first) // 2
    assert r0 == [(first, part), (2048, 512)]
    assert r1 == [(first + part, part), (2048 + 512, 512)]
    assert cfg.dataplane_region() == (g.RESERVED >> 12, 16)


@pytest.fixture
def dm(map_name: str) -> Iterator[sd.DirtyMemory]:
    m = sd.DirtyMemory.create(8 << 20, block_pages=1024, name=map_name)
    yield m
    m.destroy()


@needs_kvm
@pytest.mark.parametrize("pattern, steps", [("random", 40_000), ("sequential", 5),
                                            ("hot", 200_000)])
def test_vm_ends_as_the_model_says(dm: sd.DirtyMemory, pattern: str, steps: int) -> None:
    from shmdirty.workers.vm import GuestVM
    cfg = g.GuestConfig(ram=8 << 20, pattern=pattern, steps=steps, hot_pages=16, spin=7,
                        dataplane_pages=16, hotplug=((steps // 2, 4 << 20),))
    vm = GuestVM(dm, cfg)
    try:
        vm.boot()
        vm.run_to_end(timeout=60)
        got = vm.results()
        assert not vm.errors
        assert [b for b in dm.ram_blocks()] == cfg.block_offsets()
        assert vm.progress() == [steps, steps]
    finally:
        vm.close()
    want = expected(cfg)
    for v in range(cfg.vcpus):
        assert {k: got[v][k] for k in want[v]} == want[v]
    # the model is not vacuous: another seed, another end
    other = expected(g.GuestConfig(**{**cfg.__dict__, "seed": cfg.seed + 1}))
    assert other[0]["checksum"] != want[0]["checksum"]


@needs_kvm
def test_a_paused_guest_resumes_in_another_vm_with_its_hot_add(map_name: str) -> None:
    """The receiver's path without a socket: pause a VM, copy its RAM and
    vCPU state into a fresh VM over another map, run that to the end: the
    model's end, whether the hot-add was made before or after the pause."""
    from shmdirty.workers.vm import GuestVM
    cfg = g.GuestConfig(ram=8 << 20, pattern="random", steps=30_000, spin=50,
                        dataplane_pages=16, hotplug=((29_000, 4 << 20),))
    src_dm = sd.DirtyMemory.create(cfg.ram, block_pages=1024, name=map_name)
    dst_dm = sd.DirtyMemory.create(0, name=f"{map_name}_dst")
    src = dst = None
    try:
        src = GuestVM(src_dm, cfg)
        src.boot()
        src.start()
        src.handle_events(timeout=0.05)
        states = src.pause()
        before = src.progress()
        dst = GuestVM(dst_dm, cfg, log_dirty=False)
        dst.ensure_blocks(src_dm.ram_blocks())
        for s_view, d_view in zip(src.ram.views, dst.ram.views, strict=True):
            d_view[:] = s_view
        hotadds = src.hotadd_counts
        dst.restore(states, hotadds)
        dst.run_to_end(timeout=60)
        got = dst.results()
        assert not dst.errors
        assert dst_dm.ram_blocks() == cfg.block_offsets()
        if all(p < 29_000 for p in before):      # paused before: the destination hot-added
            assert dst.hotadds and len(src_dm.ram_blocks()) == 1
    finally:
        for vm in (src, dst):
            if vm is not None:
                vm.close()
        src_dm.destroy()
        dst_dm.destroy()
    for v, want in enumerate(expected(cfg)):
        assert {k: got[v][k] for k in want} == want
