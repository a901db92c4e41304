"""Grant mode on the register window: ACCESS_PLATFORM offered must be accepted (issue 15 item 6).

With Xen grants every address in the rings is a grant reference, so the device offers
ACCESS_PLATFORM. A driver that declines it would give guest-physical addresses and fault on
every access; FEATURES_OK is refused instead (it reads back clear, Linux gives up the device).
"""

from __future__ import annotations

import structlog.testing

from tests.test_mmio_rig import Rig, bring_up, make_rig, negotiate
from vmmiod.mmio_regs import DRIVER_OK, FEATURES_OK, STATUS
from vmmiod.transport import VIRTIO_F_ACCESS_PLATFORM, bit

AP = bit(VIRTIO_F_ACCESS_PLATFORM)


def grant_rig(version: int = 2) -> Rig:
    rig = make_rig(version)
    rig.device.access_platform = True  # what the daemon passes under a grant-mode adaptor
    rig.w(STATUS, 0)  # the window computes its offer at reset
    return rig


def test_declining_access_platform_is_refused_at_features_ok() -> None:
    rig = grant_rig()
    assert rig.window.offered_features & AP
    with structlog.testing.capture_logs() as logs:
        negotiate(rig, rig.window.offered_features & ~AP)
    assert not rig.r(STATUS) & FEATURES_OK
    rejected = [e for e in logs if e["event"] == "features_rejected"]
    assert rejected and "ACCESS_PLATFORM" in rejected[0]["reason"]


def test_accepting_access_platform_works() -> None:
    rig = grant_rig()
    bring_up(rig)
    assert rig.r(STATUS) & DRIVER_OK and rig.device.active
    assert rig.window.features & AP


def test_legacy_driver_in_grant_mode_is_refused_at_driver_ok() -> None:
    rig = grant_rig(version=1)
    bring_up(rig, rig.window.offered_features & ~AP)
    assert not rig.device.active


def test_without_grants_the_feature_is_neither_offered_nor_needed() -> None:
    rig = make_rig()
    assert not rig.window.offered_features & AP
    bring_up(rig)
    assert rig.device.active
