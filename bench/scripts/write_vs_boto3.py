"""Issue 4 figure: sequential write of a 2 GiB file through objfs (dd bs=1M, and conv=fsync)
against a boto3 multipart upload of the same bytes with the same part size and concurrency,
alternating in the same run; peak daemon RSS (VmHWM) during each objfs write."""
import os, subprocess, sys, time, statistics, json
import boto3
from boto3.s3.transfer import TransferConfig

ep, bucket, mnt, src, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
size = os.path.getsize(src)
s3 = boto3.client("s3", endpoint_url=ep)
cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)
pid = int(os.getxattr(mnt, "user.objfs.pid"))

def hwm_reset():
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")

def hwm():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

res = {"dd": [], "dd_fsync": [], "boto3": [], "rss_dd": [], "rss_dd_fsync": []}
for r in range(runs):
    for kind in ("dd", "dd_fsync", "boto3"):
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        subprocess.run(["cat", src], stdout=subprocess.DEVNULL)  # source bytes in memory
        t = time.monotonic()
        if kind == "boto3":
            s3.upload_file(src, bucket, f"wb/boto3-{r}.bin", Config=cfg)
        else:
            hwm_reset()
            cmd = ["dd", f"if={src}", f"of={mnt}/wb/{kind}-{r}.bin", "bs=1M"]
            if kind == "dd_fsync":
                cmd.append("conv=fsync")
            subprocess.run(cmd, check=True, capture_output=True)
        dt = time.monotonic() - t
        res[kind].append(size / dt / 1e6)
        if kind != "boto3":
            res["rss_" + kind].append(hwm())
        print(kind, r, f"{size / dt / 1e6:.1f} MB/s", file=sys.stderr)
out = {k: (statistics.median(v), min(v), max(v)) for k, v in res.items()}
out["ratio_dd_vs_boto3"] = statistics.median(a / b for a, b in zip(res["dd"], res["boto3"]))
out["ratio_dd_fsync_vs_boto3"] = statistics.median(a / b for a, b in zip(res["dd_fsync"], res["boto3"]))
print(json.dumps(out, indent=1))
