"""Skip markers for tests that need /dev/kvm, binutils or a C compiler."""

from __future__ import annotations

import shutil

import pytest

from shmdirty.workers import kvm

KVM_OK, KVM_WHY = kvm.usable()
needs_kvm = pytest.mark.skipif(not KVM_OK, reason=f"needs a usable /dev/kvm: {KVM_WHY}")
needs_binutils = pytest.mark.skipif(
    not (shutil.which("as") and shutil.which("objcopy")),
    reason="needs binutils (as, objcopy) to re-assemble the guest")
needs_cc = pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler (cc)")
