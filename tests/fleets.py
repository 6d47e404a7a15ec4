"""Small fleets for tests: every device fast unless a test slows one down."""

from pathlib import Path

import yaml

from fedlora_edge.core.profile import DeviceProfile, save_profile

FAST_PROFILE = dict(memory_total_gb=16.0, memory_usable_gb=8.0, compute_gflops=1e6, uplink_mbps=1e4,
                    downlink_mbps=1e4, threads=1)


def fleet(tmp: Path, ids: list[str], **profile) -> str:
    files = []
    for i in ids:
        p = tmp / f"profile-{i}.yaml"
        save_profile(DeviceProfile(name=f"test-{i}", **{**FAST_PROFILE, **profile.get(i, {})}), p)
        files.append({"id": i, "profile": str(p)})
    f = tmp / "fleet.yaml"
    f.write_text(yaml.safe_dump({"devices": files}))
    return str(f)
