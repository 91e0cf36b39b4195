"""data_tools.shard as users bring data (issue 41, sections 2 and 5): re-runs after the source
changed, list files (CSV/TSV, headers, numeric labels), parts written on several machines and
joined under one class map (by hand and as a 2-node job on the loopback SLURM cluster), audio-only
mp4s, 16-bit PNGs."""
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_tools.check import main as check_main
from data_tools.shard import main as shard_main
from rin_scale.config import load_config
from rin_scale.data import iter_samples
from rin_scale.shards import list_shards, read_tar_samples

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def shard(*args):
    """(exit status, stdout, stderr) of data_tools.shard's main() in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = shard_main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def image_folder(root, counts):
    """Class folders {name: n} of small JPEGs; returns the files."""
    rng = np.random.default_rng(0)
    files = []
    for c, n in counts.items():
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            p = root / c / f"{c}{i:03d}.jpg"
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(p)
            files.append(str(p))
    return files


def samples(out):
    """[(source, class name or None)] of every sample in the dataset at out, via its manifest."""
    shards, _, man = list_shards(str(out))
    got = []
    for s in shards:
        for _, smp in read_tar_samples(s):
            c = int(smp["cls"]) if "cls" in smp else None
            got.append((json.loads(smp["json"])["source"], None if c is None else man["classes"][c]))
    return got


# --------------------------------------------------------------------------------------------
# Re-running after the source changed


def test_rerun_after_files_were_added_refuses_in_one_line_and_never_reports_old_counts(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    image_folder(src, {"a": 5, "b": 5})
    rc, stdout, _ = shard(src, out, "--shard-size", 4, "--workers", 1, "--quiet")
    assert rc == 0 and stdout.startswith("wrote 10 image samples from 10 inputs")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the same source again: nothing written, and said so
    rc, stdout, _ = shard(src, out, "--shard-size", 4, "--workers", 1, "--quiet")
    assert rc == 0 and stdout.startswith("nothing to do: ") and "already holds 10 image samples" in stdout
    assert "wrote" not in stdout
    # files added (and one removed): one line, exit 2, the dataset untouched
    image_folder(tmp_path / "more", {"a": 3})
    for p in (tmp_path / "more" / "a").iterdir():
        p.rename(src / "a" / f"new_{p.name}")
    (src / "b" / "b000.jpg").unlink()
    rc, stdout, err = shard(src, out, "--shard-size", 4, "--workers", 1, "--quiet")
    assert rc == 2 and stdout == "" and err.count("\n") == 1, (stdout, err)
    assert err.startswith("error: the source changed since the data-* shards in ")
    assert "3 new, 1 gone (12 inputs now, 10 then)" in err and "another folder" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the fix it names works: another folder gets all 12
    rc, stdout, _ = shard(src, tmp_path / "out2", "--shard-size", 4, "--workers", 1, "--quiet")
    assert rc == 0 and stdout.startswith("wrote 12 image samples from 12 inputs")


def test_rerun_of_an_unfinished_job_over_a_changed_source_refuses(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    image_folder(src, {"a": 6})
    # part 0 of 2 finished; the source changes before part 1 runs
    assert shard(src, out, "--part", "0/2", "--workers", 1, "--quiet")[0] == 0
    image_folder(tmp_path / "more", {"z": 2})
    os.rename(tmp_path / "more" / "z", src / "z")
    rc, _, err = shard(src, out, "--part", "0/2", "--workers", 1, "--quiet")
    assert rc == 2 and "the source changed" in err and "2 new, 0 gone" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# List files


def test_list_files_csv_tsv_headers_and_numeric_labels(tmp_path):
    names = [f"f{i}.jpg" for i in range(6)]
    rng = np.random.default_rng(1)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / n)
    labels = [2, 10, 0, 2, 10, 0]
    rows = list(zip(names, labels))
    lists = {
        "tsv_header.txt": "path\tlabel\n" + "".join(f"{n}\t{y}\n" for n, y in rows),
        "tsv_plain.tsv": "".join(f"{n}\t{y}\n" for n, y in rows),
        "csv_header.csv": "filename,class\n" + "".join(f"{n},{y}\n" for n, y in rows),
        "csv_plain.csv": "".join(f"{n},{y}\n" for n, y in rows),
        "csv_in_txt.txt": "".join(f"{n},{y}\n" for n, y in rows),
        "label_first.csv": "label,image\n" + "".join(f"{y},{n}\n" for n, y in rows),
        "quoted.csv": "path,label,comment\n" + "".join(f'"{n}",{y},"a, b"\n' for n, y in rows),
    }
    for name, text in lists.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / ("out_" + name.replace(".", "_"))
        rc, stdout, err = shard(tmp_path / name, out, "--workers", 1, "--quiet")
        assert rc == 0, (name, err)
        assert "wrote 6 image samples from 6 inputs" in stdout and err == "", (name, stdout, err)
        man = json.loads((out / "data-manifest.json").read_text())
        # label 2 is class index 2 (not the string order, where "10" < "2"); the map runs 0..10
        assert man["classes"] == [str(i) for i in range(11)], name
        got = {os.path.basename(s): int(c) for s, c in samples(out)}
        assert got == {n: y for n, y in rows}, name
    # names stay names, numbered in sorted order; a list file of names with a header too
    (tmp_path / "named.csv").write_text("path,label\n" + "".join(f"{n},{'cat' if y else 'dog'}\n" for n, y in rows))
    assert shard(tmp_path / "named.csv", tmp_path / "named", "--workers", 1, "--quiet")[0] == 0
    assert json.loads((tmp_path / "named" / "data-manifest.json").read_text())["classes"] == ["cat", "dog"]
    # --labels name keeps numbers as names; --header no makes a header-looking row a file
    assert shard(tmp_path / "csv_plain.csv", tmp_path / "as_names", "--labels", "name", "--workers", 1,
                 "--quiet")[0] == 0
    assert json.loads((tmp_path / "as_names" / "data-manifest.json").read_text())["classes"] == ["0", "10", "2"]
    rc, _, err = shard(tmp_path / "tsv_header.txt", tmp_path / "forced", "--header", "no", "--workers", 1, "--quiet")
    man = json.loads((tmp_path / "forced" / "data-manifest.json").read_text())
    assert man["skipped"] == 1 and man["errors"][0]["source"].endswith("/path")


# --------------------------------------------------------------------------------------------
# Parts on several machines: one class map, one manifest


def test_parts_share_one_class_map_and_join_into_one_manifest(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    files = image_folder(src, {"a": 6, "b": 6, "c": 1})  # c lands in one part only
    for i in range(3):  # any order; the last to finish joins
        rc, stdout, err = shard(src, out, "--part", f"{(i + 1) % 3}/3", "--shard-size", 2, "--workers", 1, "--quiet")
        assert rc == 0, err
    assert "wrote 13 image samples from 13 inputs" in stdout and "(joined 3 parts)" in stdout
    recs = [json.loads((out / f"data-p{i:04d}of0003.json").read_text()) for i in range(3)]
    assert all(r["classes"] == ["a", "b", "c"] for r in recs)  # fixed from the whole listing
    man = json.loads((out / "data-manifest.json").read_text())
    assert man["parts"] == 3 and man["total"] == 13 and man["classes"] == ["a", "b", "c"]
    got = samples(out)
    assert sorted(s for s, _ in got) == sorted(files)  # every file exactly once
    assert all(os.path.basename(os.path.dirname(s)) == c for s, c in got)  # labels from one map
    assert not list(out.glob("*progress*"))
    # the loader and the inspector read the joined dataset
    read = [(y, k) for _, y, k in iter_samples(str(out), load_config("tiny", ["model.image_size=8"]).model)]
    assert len({k for _, k in read}) == 13 and sorted(y for y, _ in read) == [0] * 6 + [1] * 6 + [2]
    rc = check_main([str(out)])
    assert rc == 0
    # --join again: the same manifest; a re-run of a part: nothing to do
    before = (out / "data-manifest.json").read_bytes()
    rc, stdout, _ = shard(out, "--join")
    assert rc == 0 and stdout.startswith("joined 3 part(s): 13 image samples") and \
        (out / "data-manifest.json").read_bytes() == before
    rc, stdout, _ = shard(src, out, "--part", "1/3", "--shard-size", 2, "--workers", 1, "--quiet")
    assert rc == 0 and stdout.startswith("nothing to do")


def test_join_names_the_missing_parts_and_separate_runs_share_a_given_class_map(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    image_folder(src, {"a": 3, "b": 3})
    assert shard(src, out, "--part", "0/3", "--workers", 1, "--quiet")[0] == 0
    rc, _, err = shard(out, "--join")
    assert rc == 2 and "parts 1, 2 of 3" in err and "--part 1/3" in err and err.count("\n") == 1
    assert not (out / "data-manifest.json").exists()
    err = io.StringIO()
    with contextlib.redirect_stdout(err):
        assert check_main([str(out)]) == 1  # the inspector names the missing join
    assert "no joined manifest: run python -m data_tools.shard --join" in err.getvalue()
    rc, _, err = shard(src, out, "--part", "3/3", "--workers", 1, "--quiet")
    assert rc == 2 and "I counts from 0 to N-1" in err
    # two folders sharded in separate runs: --classes fixes one map for both
    image_folder(tmp_path / "x", {"c": 2, "d": 2})
    image_folder(tmp_path / "y", {"a": 2, "d": 2})
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    for part in ("x", "y"):
        assert shard(tmp_path / part, tmp_path / f"out_{part}", "--classes", tmp_path / "classes.txt",
                     "--workers", 1, "--quiet")[0] == 0
        assert all(c == os.path.basename(os.path.dirname(s)) for s, c in samples(tmp_path / f"out_{part}"))
    rc, _, err = shard(src, tmp_path / "bad", "--classes", tmp_path / "classes.txt", "--workers", 1, "--quiet")
    assert rc == 0
    (tmp_path / "few.txt").write_text("a\n")
    rc, _, err = shard(src, tmp_path / "bad2", "--classes", tmp_path / "few.txt", "--workers", 1, "--quiet")
    assert rc == 2 and "1 class(es)" in err and "(b)" in err


# --------------------------------------------------------------------------------------------
# Audio-only mp4, 16-bit PNG


def _audio_only_mp4(path):
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        t = np.linspace(0, 1, 16000, dtype=np.float32)
        for i in range(0, 16000, 1024):
            chunk = np.sin(2 * np.pi * 440 * t[i:i + 1024])[None].astype(np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def test_audio_only_mp4_is_one_error_line_not_a_traceback(tmp_path):
    from data_tools.embedded import moving_digits
    from rin_scale.media import encode_mp4

    src = tmp_path / "videos"
    src.mkdir()
    for i, (_, clip, _) in enumerate(list(moving_digits("heldout", frames=4, size=16))[:2]):
        (src / f"v{i}.mp4").write_bytes(encode_mp4(clip))
    _audio_only_mp4(src / "podcast.mp4")
    rc, stdout, err = shard(src, tmp_path / "out", "--workers", 1, "--quiet")
    assert rc == 0 and "Traceback" not in err and "IndexError" not in stdout + err
    assert stdout.startswith("wrote 2 video samples from 3 inputs") and "skipped 1 input file(s)" in stdout
    (e,) = json.loads((tmp_path / "out" / "data-manifest.json").read_text())["errors"]
    assert e["source"].endswith("podcast.mp4") and e["error"] == "ValueError: no video stream"


def test_16bit_pngs_are_stored_as_8bit_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgb16 = np.zeros((8, 8, 3), ">u2")
    rgb16[..., 0] = 65535
    rgb16[..., 1] = 32768
    import zlib

    def png(arr):  # a 16-bit RGB PNG written by hand (Pillow cannot write one)
        import struct

        h, w, _ = arr.shape
        raw = b"".join(b"\0" + arr[y].tobytes() for y in range(h))

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

    (src / "rgb16.png").write_bytes(png(rgb16))
    Image.fromarray(np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))).save(src / "grey16.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(src / "rgb8.png")
    rc, stdout, _ = shard(src, tmp_path / "out", "--workers", 1, "--quiet")
    assert rc == 0 and stdout.count("\n") == 1 and stdout.rstrip().endswith("; 2 16-bit image(s) stored as 8-bit")
    man = json.loads((tmp_path / "out" / "data-manifest.json").read_text())
    assert man["converted_16bit"] == 2
    for _, s in read_tar_samples(str(tmp_path / "out" / "data-000000.tar")):
        assert s["png"][24] == 8  # IHDR bit depth: every stored PNG is 8-bit
        meta = json.loads(s["json"])
        assert meta.get("source_bits") == (16 if "16" in os.path.basename(meta["source"]) else None)
        if meta["source"].endswith("rgb16.png"):
            assert np.asarray(Image.open(io.BytesIO(s["png"])))[0, 0].tolist() == [255, 128, 0]


# --------------------------------------------------------------------------------------------
# 2 nodes on the loopback SLURM cluster through the project's launcher





@pytest.mark.timeout(600)
def test_shard_service_writes_2_parts_on_2_slurm_nodes_into_one_manifest(slurm, tmp_path):
    src, out, folder = tmp_path / "src", tmp_path / "out", tmp_path / "submitit"
    files = image_folder(src, {"cat": 7, "dog": 6, "eel": 1})
    cli = [sys.executable, "-m", "launch.submit", "--service", "shard", str(src), str(out), "--shard-size", "3",
           "--workers", "1", "--executor", "slurm", "--nodes", "2", "--time-min", "20", "--folder", str(folder),
           "--wait"]
    p = subprocess.run(cli, env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=500)
    logs = ""
    if p.returncode:
        for f in sorted((folder / "shard").glob("*_log.*")):
            logs += f"\n--- {f.name}\n" + f.read_text()[-2000:]
    assert p.returncode == 0, p.stdout + p.stderr + logs
    assert f"{out}: 14 image samples from 14 inputs" in p.stdout and "2 part(s), 3 classes" in p.stdout
    # each node wrote its part; one manifest over both, one class map
    recs = [json.loads((out / f"data-p{i:04d}of0002.json").read_text()) for i in range(2)]
    assert [r["part"] for r in recs] == [[0, 2], [1, 2]] and all(r["classes"] == ["cat", "dog", "eel"] for r in recs)
    man = json.loads((out / "data-manifest.json").read_text())
    assert man["parts"] == 2 and man["classes"] == ["cat", "dog", "eel"] and man["total"] == 14
    got = samples(out)
    assert sorted(s for s, _ in got) == sorted(files)  # every source file exactly once
    assert all(os.path.basename(os.path.dirname(s)) == c for s, c in got)
    rows = [json.loads(ln) for ln in (folder / "launch.jsonl").read_text().splitlines()]
    started = [r for r in rows if r["event"] == "started"]
    assert started and started[0]["world_size"] == 2 and started[0]["hosts"] == ["node1", "node2"]
    assert check_main([str(out)]) == 0
