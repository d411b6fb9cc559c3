"""How much free memory the driver needs beyond a request, by request size: the measurement behind
the allocator capacity's driver slack (calibration.yaml's driver_slack).

One process per mode, on an otherwise idle GPU, through the driver API (libcuda, no caching
allocator in between):
  cuMemAlloc   what the caching allocator's new segments call (cudaMalloc) under the default mode;
  cuMemCreate  what expandable segments call for each physical page they map.
For each request size S (a multiple of 2 MiB) a filler allocation leaves F = S + m bytes free
(cuMemGetInfo after the filler, so m is what is really left beyond S), then S is requested. Margins
m step by 2 MiB from below zero up to the first success; each attempt is freed before the next.
One row per attempt: {"kind": "driver-slack", "mode", "size", "margin", "ok", "kept"}, where
"kept" is how much more than S the free memory fell by while S was held (memory the driver keeps
for the allocation itself: page tables and the like).

  scripts/device-run.sh python3 scripts/driver_slack.py $OUT/driver-slack.jsonl
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

MIB = 1 << 20
GIB = 1 << 30
SIZES = [2 * MIB, 20 * MIB, 256 * MIB, 1 * GIB, 4 * GIB, 16 * GIB, 32 * GIB, 45 * GIB, 64 * GIB, 100 * GIB]
MARGINS_MIB = range(-2, 66, 2)


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocationProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class Driver:
    def __init__(self) -> None:
        import torch

        torch.zeros(1, device="cuda")  # the primary context, current on this thread
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.prop = _AllocationProp(type=1, requestedHandleTypes=0, location=_Location(type=1, id=0))

    def free_bytes(self) -> int:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        assert self.cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
        return free.value

    def alloc(self, mode: str, nbytes: int) -> int | None:
        handle = ctypes.c_uint64()
        if mode == "cuMemAlloc":
            status = self.cuda.cuMemAlloc_v2(ctypes.byref(handle), ctypes.c_size_t(nbytes))
        else:
            status = self.cuda.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(nbytes), ctypes.byref(self.prop),
                                           ctypes.c_ulonglong(0))
        return handle.value if status == 0 else None

    def release(self, mode: str, handle: int) -> None:
        call = self.cuda.cuMemFree_v2 if mode == "cuMemAlloc" else self.cuda.cuMemRelease
        assert call(ctypes.c_uint64(handle)) == 0


def measure(mode: str) -> list[dict]:
    driver = Driver()
    rows = []
    for size in SIZES:
        for margin_mib in MARGINS_MIB:
            before = driver.free_bytes()
            filler_bytes = (before - size - margin_mib * MIB) // (2 * MIB) * (2 * MIB)
            filler = driver.alloc("cuMemAlloc", filler_bytes)
            if filler is None:
                rows.append({"size": size, "target_margin": margin_mib * MIB, "error": "filler refused"})
                continue
            free = driver.free_bytes()
            handle = driver.alloc(mode, size)
            row = {"kind": "driver-slack", "mode": mode, "size": size, "margin": free - size, "ok": handle is not None,
                   "free_at_init": before, "filler": filler_bytes}
            if handle is not None:
                row["kept"] = free - driver.free_bytes() - size
                driver.release(mode, handle)
            driver.release("cuMemAlloc", filler)
            rows.append(row)
            if handle is not None:
                break
    return rows


def main(out_path: str) -> None:
    import torch

    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, check=False).stdout.strip()}
    with open(out_path, "a") as fh:
        for mode in ("cuMemAlloc", "cuMemCreate"):
            child = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True,
                                   check=False)
            if child.returncode != 0:
                print(child.stderr[-2000:], file=sys.stderr)
                continue
            for row in json.loads(child.stdout):
                row["env"] = env
                fh.write(json.dumps(row) + "\n")
                print(row)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2])))
    else:
        main(sys.argv[1])
