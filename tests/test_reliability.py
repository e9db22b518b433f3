"""Nothing lost, nothing silently wrong: one Llama from several threads, writes through links
and into other models' folders, full disks, what `check` verifies, files that would hang a
reader, a rank that fails or stops answering, Ctrl-C, and absurd params."""

import hashlib
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llama import checkpoint as ck
from llama import files
from llama.layout import CheckpointError
from llama.tools import check, convert, quantize, random_checkpoint, reshard
from tests.conftest import REPO, TOKENIZER, free_port, torchrun
from tests.helpers import cli

PROMPTS = ["I believe the meaning of life is", "Simply put, relativity", "你好", "The capital of France"]


def digests(folder) -> dict:
    """md5 of every file in `folder`, to tell that an input stayed bit-identical."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def hf_dir(ckpts, tmp_path_factory):
    """The GQA model in Hugging Face's format, with its tokenizer (one safetensors file)."""
    out = tmp_path_factory.mktemp("rel") / "hf"
    convert.meta_to_hf(ckpts["gqa1"], out, TOKENIZER)
    return out


@pytest.fixture(scope="module")
def hf_sharded(ckpts, tmp_path_factory):
    """The same in several safetensors files with an index."""
    out = tmp_path_factory.mktemp("rel") / "hf-sharded"
    convert.meta_to_hf(ckpts["gqa1"], out, TOKENIZER, max_shard_bytes=3 << 20)
    return out


def copy(src, dst) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return Path(dst)


# -- 1. one Llama, several callers ---------------------------------------------------------------


def test_threads_calling_text_completion_each_get_their_own_answer(gqa):
    kw = [dict(temperature=0), dict(temperature=0.8, seed=7)]
    want = {(i, j): gqa.text_completion([p], max_gen_len=12, **k)[0]["generation"]
            for i, p in enumerate(PROMPTS) for j, k in enumerate(kw)}
    got, errors = {}, []
    start = threading.Barrier(2)

    def caller(j):
        start.wait()
        try:
            for _ in range(3):
                for i, p in enumerate(PROMPTS):
                    text = gqa.text_completion([p], max_gen_len=12, **kw[j])[0]["generation"]
                    got.setdefault((i, j), set()).add(text)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == {key: {text} for key, text in want.items()}


def test_two_streams_in_one_thread_the_second_is_refused(gqa):
    whole = gqa.text_completion([PROMPTS[0]], temperature=0, max_gen_len=10)[0]["generation"]
    first = gqa.stream_completion(PROMPTS[0], temperature=0, max_gen_len=10)
    pieces = [next(first)]
    second = gqa.stream_completion(PROMPTS[1], temperature=0, max_gen_len=10)
    with pytest.raises(RuntimeError, match="this thread holds an unfinished stream of this Llama"):
        next(second)
    with pytest.raises(RuntimeError, match="unfinished stream"):
        gqa.text_completion([PROMPTS[1]], temperature=0, max_gen_len=10)
    assert "".join(pieces + list(first)) == whole  # the first stream is not disturbed
    assert "".join(gqa.stream_completion(PROMPTS[0], temperature=0, max_gen_len=10)) == whole


def test_streams_from_two_threads_are_both_right(gqa):
    want = [gqa.text_completion([p], temperature=0, max_gen_len=10)[0]["generation"] for p in PROMPTS[:2]]
    got = [None, None]
    start = threading.Barrier(2)

    def reader(i):
        stream = gqa.stream_completion(PROMPTS[i], temperature=0, max_gen_len=10)
        start.wait()
        got[i] = "".join(piece for piece in stream)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


# -- 2. writes through links, into other models' folders, onto the input ---------------------------


@pytest.mark.parametrize("tool", ["reshard", "quantize", "convert_to_hf", "convert_to_meta"])
def test_a_params_json_link_in_out_is_never_written_through(ckpts, hf_dir, tmp_path, capsys, tool):
    src = hf_dir if tool == "convert_to_meta" else Path(ckpts["gqa1"])
    target = src / ("config.json" if tool == "convert_to_meta" else "params.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "params.json").symlink_to(target)
    before = digests(src)
    main, argv = {
        "reshard": (reshard.main, ["--ckpt_dir", str(src), "--shards", "2"]),
        "quantize": (quantize.main, ["--ckpt_dir", str(src), "--mode", "int8"]),
        "convert_to_hf": (convert.main, ["--to", "hf", "--ckpt_dir", str(src)]),
        "convert_to_meta": (convert.main, ["--to", "meta", "--ckpt_dir", str(src)]),
    }[tool]
    assert cli(main, *argv, "--out", str(out)) == 2
    assert "already holds a checkpoint (params.json)" in capsys.readouterr().err
    assert digests(src) == before
    assert os.listdir(out) == ["params.json"] and (out / "params.json").is_symlink()


def test_a_dangling_link_in_out_counts_as_a_checkpoint_file(ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "params.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        reshard.reshard_dir(ckpts["gqa1"], 1, out)
    assert not (tmp_path / "elsewhere.json").exists()


@pytest.mark.parametrize("tool", ["reshard", "convert_to_meta"])
def test_writing_into_an_existing_hugging_face_folder_is_refused(ckpts, hf_dir, hf_sharded, capsys, tool):
    src = [ckpts["gqa1"]] if tool == "reshard" else [str(hf_sharded)]
    before = digests(hf_dir), digests(src[0])
    argv = (["--ckpt_dir", src[0], "--shards", "1"] if tool == "reshard" else ["--to", "meta", "--ckpt_dir", src[0]])
    assert cli(reshard.main if tool == "reshard" else convert.main, *argv, "--out", str(hf_dir)) == 2
    assert "already holds a checkpoint (config.json, model.safetensors, tokenizer.model" in capsys.readouterr().err
    assert (digests(hf_dir), digests(src[0])) == before


def test_convert_onto_its_input_is_refused_before_writing(hf_dir, capsys):
    before = digests(hf_dir)
    for out in (hf_dir, hf_dir / "meta"):  # the input itself, a new folder inside it
        assert cli(convert.main, "--to", "meta", "--ckpt_dir", str(hf_dir), "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert "is the input" in err and "SameFileError" not in err
    assert digests(hf_dir) == before and not (hf_dir / "meta").exists()


# -- 3. full disks ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 5 MB tmpfs: smaller than any output of the tiny models (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def tool_run(tool, ckpts, hf_dir, out):
    gqa1 = ckpts["gqa1"]
    return {
        "reshard": (reshard.main, ["--ckpt_dir", gqa1, "--shards", "2", "--out", out]),
        "quantize": (quantize.main, ["--ckpt_dir", gqa1, "--mode", "int8", "--out", out]),
        "convert_to_hf": (convert.main, ["--to", "hf", "--ckpt_dir", gqa1, "--tokenizer_path", TOKENIZER,
                                         "--out", out]),
        "convert_to_meta": (convert.main, ["--to", "meta", "--ckpt_dir", str(hf_dir), "--out", out]),
        "random_checkpoint": (random_checkpoint.main, [out, "--dim", "64", "--n_heads", "4", "--shards", "2"]),
    }[tool]


TOOLS = ["reshard", "quantize", "convert_to_hf", "convert_to_meta", "random_checkpoint"]


def assert_no_space(status, err, disk):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no space left on the disk of '{disk}/out'"), err
    assert " MB needed, " in lines[0] and " MB free" in lines[0]


@pytest.mark.parametrize("tool", TOOLS)
def test_full_disk_is_told_before_anything_is_written(ckpts, hf_dir, tiny_disk, capsys, tool):
    main, argv = tool_run(tool, ckpts, hf_dir, str(tiny_disk / "out"))
    assert_no_space(cli(main, *argv), capsys.readouterr().err, tiny_disk)
    assert os.listdir(tiny_disk) == []


@pytest.mark.parametrize("tool", TOOLS)
def test_disk_filling_up_while_writing_leaves_nothing(ckpts, hf_dir, tiny_disk, capsys, monkeypatch, tool):
    """As if another program had filled the disk after the tool looked: the writes fail midway."""
    prepare = files.prepare_output
    monkeypatch.setattr(files, "prepare_output", lambda out, inputs=(), needed=None: prepare(out, inputs))
    before = digests(hf_dir if tool == "convert_to_meta" else ckpts["gqa1"])
    main, argv = tool_run(tool, ckpts, hf_dir, str(tiny_disk / "out"))
    assert_no_space(cli(main, *argv), capsys.readouterr().err, tiny_disk)
    assert os.listdir(tiny_disk) == []  # no file under its final name, no .tmp, the folder it made removed
    assert digests(hf_dir if tool == "convert_to_meta" else ckpts["gqa1"]) == before


def test_full_disk_keeps_an_output_folder_that_was_there(ckpts, hf_dir, tiny_disk, capsys, monkeypatch):
    prepare = files.prepare_output
    monkeypatch.setattr(files, "prepare_output", lambda out, inputs=(), needed=None: prepare(out, inputs))
    (tiny_disk / "out").mkdir()
    main, argv = tool_run("reshard", ckpts, hf_dir, str(tiny_disk / "out"))
    assert_no_space(cli(main, *argv), capsys.readouterr().err, tiny_disk)
    assert os.listdir(tiny_disk) == ["out"] and os.listdir(tiny_disk / "out") == []


def test_full_disk_from_the_command_line(ckpts, tiny_disk):
    res = subprocess.run([sys.executable, "-m", "llama.tools.reshard", "--ckpt_dir", ckpts["gqa1"], "--shards", "1",
                          "--out", str(tiny_disk / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_no_space(res.returncode, res.stderr, tiny_disk)
    assert os.listdir(tiny_disk) == []


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["consolidated.01.pth", "model-00002-of-00004.safetensors", "tokenizer.model"])
def test_check_never_says_ok_for_a_truncated_file(ckpts, hf_sharded, tmp_path, capsys, name):
    src = ckpts["gqa2"] if name.endswith(".pth") else hf_sharded
    folder = copy(src, tmp_path / "m")
    assert (folder / name).exists()
    truncate(folder / name)
    assert check.main([str(folder)]) == 1
    out = capsys.readouterr()
    assert "OK: ready to run" not in out.out and name in out.err


# -- 4. check says OK only when build would work ---------------------------------------------------

K = "layers.0.attention.wq.weight"


def _set(key, f):
    return lambda state: state.__setitem__(key, f(state[key]))


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


BROKEN = {
    "int64 weight": (_set(K, lambda t: t.to(torch.int64)), None, f"{K} is stored as torch.int64"),
    "int8 weight": (_set(K, lambda t: t.to(torch.int8)), None, f"{K} is stored as torch.int8"),
    "complex weight": (_set(K, lambda t: t.to(torch.complex64)), None, f"{K} is stored as torch.complex64"),
    "bool norm": (_set("norm.weight", lambda t: t.bool()), None, "norm.weight is stored as torch.bool"),
    "NaN": (_set(K, _nan), None, f"{K} in consolidated.00.pth holds NaN or infinite values"),
    "inf": (_set("norm.weight", _inf), None, "norm.weight in consolidated.00.pth holds NaN or infinite values"),
    "extra key": (lambda s: s.__setitem__("layers.0.adapter.weight", torch.zeros(4)), None, "layers.0.adapter.weight"),
    "n_layers 0": (None, {"n_layers": 0}, "n_layers must be an integer from 1 to 1024, got 0"),
    "n_layers -1": (None, {"n_layers": -1}, "n_layers must be an integer from 1 to 1024, got -1"),
    "norm_eps < 0": (None, {"norm_eps": -1e-5}, "norm_eps must be a positive number, got -1e-05"),
    "rope_theta 0": (None, {"rope_theta": 0}, "rope_theta must be a positive number, got 0"),
}


def broken_checkpoint(src, dst: Path, state_change=None, params_change=None) -> Path:
    dst.mkdir()
    state = torch.load(Path(src) / "consolidated.00.pth", weights_only=True)
    params = json.loads((Path(src) / "params.json").read_text())
    if state_change:
        state_change(state)
    params.update(params_change or {})
    torch.save(state, dst / "consolidated.00.pth")
    (dst / "params.json").write_text(json.dumps(params))
    return dst


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_reports_what_build_would_trip_on(ckpts, build, tmp_path, capsys, case):
    state_change, params_change, message = BROKEN[case]
    folder = broken_checkpoint(ckpts["gqa1"], tmp_path / "m", state_change, params_change)
    assert check.main([str(folder), "--tokenizer_path", TOKENIZER]) == 1
    out = capsys.readouterr()
    assert "OK: ready to run" not in out.out and message in out.err
    assert "download" in out.err or "correct it" in out.err  # the fix
    if case not in ("NaN", "inf"):  # those load, and give garbage
        with pytest.raises(CheckpointError, match=re.escape(message)):
            build(str(folder))


@pytest.mark.parametrize("entries", [["../../etc/passwd"], ["/etc/passwd"], ["link-out"]])
def test_checklist_entries_outside_the_folder_are_errors_never_read(ckpts, tmp_path, monkeypatch, entries):
    folder = copy(ckpts["gqa1"], tmp_path / "m")
    (folder / "link-out").symlink_to("/etc/passwd")
    with open(folder / "checklist.chk", "a") as f:
        f.writelines(f"{'0' * 32}  {name}\n" for name in entries)
    read = []
    md5 = ck.md5_file
    monkeypatch.setattr(ck, "md5_file", lambda path: read.append(Path(path).resolve()) or md5(path))
    problems = check.check(folder)
    assert [p for p in problems if "outside the folder" in p] == [
        f"checklist.chk lists {entries[0]!r}, outside the folder (or a link out of it): not read; "
        "download checklist.chk again"]
    assert read and all(p.is_relative_to(folder.resolve()) for p in read)


def test_a_checklist_of_outside_files_only_fails(ckpts, tmp_path):
    folder = copy(ckpts["gqa1"], tmp_path / "m")
    (folder / "checklist.chk").write_text(f"{'0' * 32}  ../../etc/passwd\n{'0' * 32}  /etc/hostname\n")
    problems = check.check(folder)
    assert any("consolidated.00.pth is not listed in checklist.chk" in p for p in problems)
    assert sum("outside the folder" in p for p in problems) == 2


@pytest.mark.parametrize("how", ["path", "link"])
def test_an_index_naming_files_outside_the_folder_makes_build_refuse(hf_sharded, tmp_path, build, how):
    folder = copy(hf_sharded, tmp_path / "hf")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model-00001-of-00004.safetensors", outside)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "../outside.safetensors" if how == "path" else "model-00005-of-00004.safetensors"
    if how == "link":
        (folder / name).symlink_to(outside)
    index["weight_map"] = {k: name if f == "model-00001-of-00004.safetensors" else f
                           for k, f in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"names '{name}', which is not a file of that folder"):
        build(str(folder))
    assert any("not a file of that folder" in p for p in check.check(folder))


# -- 5. files that would hang a reader; a rank that stops answering --------------------------------


def run_tool(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("how", ["fifo shard", "shard linked to /dev/zero", "checklist names a link to /dev/zero",
                                 "checklist names /dev/zero"])
def test_pipes_and_devices_end_check_and_build_quickly(ckpts, tmp_path, how):
    folder = copy(ckpts["gqa2"], tmp_path / "m")
    if how == "fifo shard":
        (folder / "consolidated.01.pth").unlink()
        os.mkfifo(folder / "consolidated.01.pth")
    elif how == "shard linked to /dev/zero":
        (folder / "consolidated.01.pth").unlink()
        (folder / "consolidated.01.pth").symlink_to("/dev/zero")
    else:
        name = "/dev/zero" if how == "checklist names /dev/zero" else "zero"
        (folder / "zero").symlink_to("/dev/zero")
        with open(folder / "checklist.chk", "a") as f:
            f.write(f"{'0' * 32}  {name}\n")
    res = run_tool("-m", "llama.tools.check", str(folder), timeout=60)
    assert res.returncode == 1 and "OK: ready to run" not in res.stdout
    assert "not a regular file" in res.stderr or "outside the folder" in res.stderr
    if "shard" in how:
        res = run_tool("example_text_completion.py", "--ckpt_dir", str(folder), "--tokenizer_path", TOKENIZER,
                       timeout=60)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "consolidated.01.pth' is not a regular file of the folder" in res.stderr


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_tokenizer_that_is_a_pipe_or_device_is_refused_at_once(tmp_path, kind):
    from llama.tokenizer import Tokenizer

    path = "/dev/zero" if kind == "device" else str(tmp_path / "tokenizer.model")
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ValueError, match="is not a regular file"):
        Tokenizer(path)


def test_the_timeout_is_read_from_the_environment(monkeypatch):
    from llama.distributed import timeout

    assert timeout().total_seconds() == 120
    monkeypatch.setenv("LLAMA_TIMEOUT_S", "7.5")
    assert timeout().total_seconds() == 7.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("LLAMA_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="LLAMA_TIMEOUT_S must be a number of seconds above 0"):
            timeout()


def through_our_code(stderr: str) -> bool:
    """Whether a traceback in `stderr` passes through the library (torchrun's own may be there)."""
    return f'File "{REPO / "llama"}' in stderr


def worker(mode, ckpt_dir, *extra):
    return ("tests/fault_worker.py", mode, ckpt_dir, TOKENIZER, *extra)


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_within_the_timeout(ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TIMEOUT_S", "5")
    pid_file = tmp_path / "rank1.pid"
    start = time.time()
    try:
        res = torchrun(2, *worker("stop_rank1", ckpts["gqa2"], str(pid_file)), timeout=150)
    finally:  # the stopped rank, should torchrun not have killed it
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    elapsed = time.time() - start
    assert pid_file.exists() and res.returncode != 0
    assert "error: another process did not answer within 5 s (it is stopped or hung): the run ends; " \
           "LLAMA_TIMEOUT_S=SECONDS waits longer" in res.stderr
    assert elapsed < 5 + 30 + 40  # the timeout, torchrun's 30 s before it kills a stopped process, start-up


# -- 6. errors on one rank, Ctrl-C -----------------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("mode, line", [
    ("error_on_rank1", "error on rank 1: 5 prompts but max_batch_size is 4"),
    ("error_everywhere", "5 prompts but max_batch_size is 4"),  # told by whichever rank came first
])
def test_an_error_is_told_once_by_its_rank_and_ends_the_others(ckpts, mode, line):
    start = time.time()
    res = torchrun(2, *worker(mode, ckpts["gqa2"]), timeout=120)
    assert res.returncode != 0 and time.time() - start < 60
    errors = [x for x in res.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 1 and line in errors[0], res.stderr[-3000:]
    assert "Connection closed by peer" not in res.stderr and "Connection reset by peer" not in res.stderr
    assert not through_our_code(res.stderr)


def start_torchrun(*args, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env, **kw)


class Output:
    """A pipe read on a thread, so a test can wait for text in it."""

    def __init__(self, pipe):
        self.chunks = []
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe):
        for chunk in iter(lambda: pipe.read1(4096), b""):
            self.chunks.append(chunk.decode(errors="replace"))

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def wait_for(self, text: str, timeout: float = 120, count: int = 1) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            if self.text.count(text) >= count:
                return True
            time.sleep(0.05)
        return False


@pytest.mark.multiproc
@pytest.mark.slow
def test_ctrl_c_ends_a_torchrun_run_cleanly(ckpts):
    proc = start_torchrun(*worker("long", ckpts["gqa2"]))
    try:
        out, err = Output(proc.stdout), Output(proc.stderr)
        assert out.wait_for("generating"), err.text[-3000:]
        time.sleep(1)
        start = time.time()
        proc.send_signal(signal.SIGINT)  # what the terminal does: torchrun's workers have sessions of their own
        proc.wait(timeout=40)
        assert time.time() - start < 15
        time.sleep(0.5)
        assert not through_our_code(err.text) and "KeyboardInterrupt" not in err.text, err.text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.multiproc
@pytest.mark.slow
def test_ctrl_c_in_the_chat_under_torchrun_stops_the_answer_and_keeps_the_chat(ckpts):
    import fcntl
    import termios

    master, slave = pty.openpty()

    def terminal():  # the pty is torchrun's terminal, as a shell's would be
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = start_torchrun("-m", "llama.tools.chat", "--ckpt_dir", ckpts["gqa2"], "--tokenizer_path", TOKENIZER,
                          "--max_seq_len", "2048", "--max_gen_len", "1500", stdin=slave, preexec_fn=terminal)
    os.close(slave)
    try:
        out, err = Output(proc.stdout), Output(proc.stderr)
        assert out.wait_for("User: "), err.text[-3000:]
        os.write(master, b"Tell me a long story\n")
        assert out.wait_for("> Assistant: ")
        time.sleep(1.0)  # some of the answer streams
        os.write(master, b"\x03")
        assert out.wait_for(" (stopped)", timeout=30), out.text[-2000:] + err.text[-3000:]
        assert out.wait_for("User: ", timeout=30, count=2)
        os.write(master, b"/system Be brief\n")  # every rank is still there, in step
        assert out.wait_for("(system prompt set: Be brief)", timeout=30)
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0, err.text[-3000:]
        assert "Traceback" not in err.text and "shutting down workers" not in err.text
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


# -- 7. absurd params ------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"n_layers": 1e9}, "n_layers must be an integer from 1 to 1024, got 1000000000.0"),
    ({"n_layers": 10**9}, "n_layers must be an integer from 1 to 1024, got 1000000000"),
    ({"n_heads": 0}, "n_heads must be an integer from 1 to 64, got 0"),
    ({"multiple_of": 0}, "multiple_of must be an integer from 1 to 131072, got 0"),
    ({"dim": "64"}, "dim must be an integer from 1 to 131072, got '64'"),
])
def test_absurd_params_json_is_one_clear_message(ckpts, tmp_path, build, change, message):
    folder = copy(ckpts["gqa1"], tmp_path / "m")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(dict(params, **change)))
    with pytest.raises(CheckpointError, match=f"params.json in .* does not describe a Llama model: {message}"):
        build(str(folder))


def edit_config(folder: Path, **change) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def legacy_bin(folder: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)


HF_BROKEN = {
    "num_hidden_layers 1e9": (lambda d: edit_config(d, num_hidden_layers=10**9), "n_layers must be an integer from 1"),
    "num_attention_heads 0": (lambda d: edit_config(d, num_attention_heads=0), "n_heads must be an integer from 1"),
    "hidden_size a string": (lambda d: edit_config(d, hidden_size="64"), "dim must be an integer from 1"),
    "no hidden_size": (lambda d: edit_config(d, hidden_size=None), "config.json lacks hidden_size"),
    "truncated safetensors": (lambda d: truncate(d / "model.safetensors"), "it is truncated or corrupt"),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("{"), "is not a weight index"),
    "index without weight_map": (lambda d: (d / "model.safetensors.index.json").write_text("{}"),
                                 "is not a weight index"),
    "index weight_map a list": (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": []}'),
                                "is not a weight index"),
    "pytorch_model.bin not a pickle of tensors": (
        lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"\x80\x02junk" * 50)),
        "pytorch_model.bin': it is truncated, corrupt or holds more than tensors"),
}


@pytest.mark.parametrize("case", list(HF_BROKEN))
def test_broken_hugging_face_folders_are_one_clear_message(hf_dir, hf_sharded, tmp_path, build, case):
    change, message = HF_BROKEN[case]
    folder = copy(hf_sharded if case.startswith("index") else hf_dir, tmp_path / "hf")
    change(folder)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        build(str(folder))
    assert any(message in p for p in check.check(folder))


def test_a_legacy_pickled_pytorch_model_bin_loads(hf_dir, tmp_path, build):
    folder = copy(hf_dir, tmp_path / "hf")
    legacy_bin(folder)
    want = build(str(hf_dir)).text_completion(PROMPTS[:1], temperature=0, max_gen_len=6)
    assert build(str(folder)).text_completion(PROMPTS[:1], temperature=0, max_gen_len=6) == want


@pytest.mark.parametrize("where", ["meta", "hf"])
def test_absurd_sizes_from_the_command_line_are_one_line_without_memory_growth(ckpts, hf_dir, tmp_path, where):
    if where == "meta":
        folder = copy(ckpts["gqa1"], tmp_path / "m")
        params = json.loads((folder / "params.json").read_text())
        (folder / "params.json").write_text(json.dumps(dict(params, n_layers=1e9)))
    else:
        folder = copy(hf_dir, tmp_path / "hf")
        edit_config(folder, num_hidden_layers=10**9)
    res = run_tool("example_text_completion.py", "--ckpt_dir", str(folder), "--tokenizer_path", TOKENIZER, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "n_layers must be an integer from 1 to 1024" in res.stderr
