"""The C++ paged-attention kernel against the torch reference, on random steps: decodes and
prefill chunks mixed, GQA, several block sizes, partial blocks, prefix sharing in a step."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from attention_backends import needs_kernel

from fleetserve.attention import SeqSpec, build_attention_metadata, cpu_extension, get_backend
from fleetserve.attention.cpu_extension import ExtensionUnavailable

ROOT = Path(__file__).resolve().parent.parent
MAX_SEQS, MAX_LEN = 6, 80


def num_blocks(block_size: int) -> int:
    """Enough for MAX_SEQS sequences of MAX_LEN tokens, plus block 0 that pads tables."""
    return 1 + MAX_SEQS * -(-MAX_LEN // block_size)


def random_step(rng: random.Random, block_size: int, num_seqs: int) -> list[SeqSpec]:
    """Decodes first, then prefills (some over cached tokens); blocks drawn without reuse,
    except that a prefill may share the first blocks of an earlier sequence of the step."""
    free = list(range(1, num_blocks(block_size)))
    rng.shuffle(free)
    specs: list[SeqSpec] = []
    num_decodes = rng.randint(0, num_seqs)
    for i in range(num_seqs):
        if i < num_decodes:
            computed, new = rng.randint(1, 70), 1
        else:
            computed, new = rng.choice([0, 0, rng.randint(1, 40)]), rng.randint(2, 40)
        total = computed + new
        need = -(-total // block_size)
        shared: list[int] = []
        if specs and i >= num_decodes and computed >= block_size and rng.random() < 0.5:
            donor = rng.choice(specs)  # a shared prefix: full blocks of another sequence
            full = min(computed // block_size, len(donor.block_ids) - 1)
            shared = donor.block_ids[: max(full, 0)]
        ids = shared + [free.pop() for _ in range(need - len(shared))]
        specs.append(SeqSpec(computed, new, ids))
    return specs


def run_backend(name, q, k, v, cache, meta, scale):
    cache = cache.clone()
    out = get_backend(name).forward(q, k, v, cache, meta, scale)
    return out, cache


@needs_kernel
@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_matches_torch_backend_fp32(block_size, heads, head_dim):
    num_heads, num_kv_heads = heads
    rng = random.Random(block_size * 100 + num_heads * 10 + head_dim)
    torch.manual_seed(rng.randrange(1000))
    for _ in range(4):
        specs = random_step(rng, block_size, rng.randint(1, MAX_SEQS))
        meta = build_attention_metadata(specs, block_size)
        n = meta.query_start_loc[-1]
        q = torch.randn(n, num_heads, head_dim)
        k = torch.randn(n, num_kv_heads, head_dim)
        v = torch.randn(n, num_kv_heads, head_dim)
        cache = torch.randn(2, num_kv_heads, num_blocks(block_size), block_size, head_dim)
        expected, expected_cache = run_backend("torch", q, k, v, cache, meta, 0.3)
        got, got_cache = run_backend("cpu", q, k, v, cache, meta, 0.3)
        torch.testing.assert_close(got_cache, expected_cache, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The op itself on every sequence, first prefill chunks included (which the backend
        # leaves to SDPA).
        direct = torch.full_like(q, float("nan"))
        torch.ops.fleetserve.paged_attention(
            direct,
            q,
            expected_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            list(range(meta.num_seqs)),
            0.3,
        )
        torch.testing.assert_close(direct, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bf16_cache_is_as_close_as_the_reference():
    """In bf16 both backends round; the kernel (fp32 inside) is no farther from the fp32
    answer than the reference is."""
    rng = random.Random(7)
    torch.manual_seed(7)
    block_size, num_heads, num_kv_heads, head_dim = 16, 9, 3, 64
    specs = random_step(rng, block_size, MAX_SEQS)
    meta = build_attention_metadata(specs, block_size)
    n = meta.query_start_loc[-1]
    q, k, v = (torch.randn(n, h, head_dim) for h in (num_heads, num_kv_heads, num_kv_heads))
    cache = torch.randn(2, num_kv_heads, num_blocks(block_size), block_size, head_dim)
    bf = [t.bfloat16() for t in (q, k, v, cache)]
    exact, _ = run_backend("torch", *(t.float() for t in bf), meta, 0.125)
    ref, _ = run_backend("torch", *bf, meta, 0.125)
    got, _ = run_backend("cpu", *bf, meta, 0.125)
    assert got.dtype == torch.bfloat16
    ref_err = (ref.float() - exact).abs().max().item()
    got_err = (got.float() - exact).abs().max().item()
    assert got_err <= ref_err + 1e-6, (got_err, ref_err)
    assert got_err < 0.02


@needs_kernel
def test_unsupported_cache_dtype_goes_to_the_reference():
    specs = [SeqSpec(3, 1, [1]), SeqSpec(0, 5, [2])]
    meta = build_attention_metadata(specs, 8)
    q, k, v = torch.randn(6, 2, 8).half(), torch.randn(6, 1, 8).half(), torch.randn(6, 1, 8)
    cache = torch.randn(2, 1, 4, 8, 8).half()
    expected, _ = run_backend("torch", q, k, v.half(), cache, meta, 0.5)
    got, _ = run_backend("cpu", q, k, v.half(), cache, meta, 0.5)
    torch.testing.assert_close(got, expected)


@needs_kernel
def test_kernel_rejects_a_block_id_outside_the_cache():
    specs = [SeqSpec(3, 1, [1])]
    meta = build_attention_metadata(specs, 4)
    meta.block_tables[0, 0] = 99
    q, kv = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    cache = torch.zeros(2, 2, 4, 4, 8)
    with pytest.raises(RuntimeError, match="block id out of range"):
        get_backend("cpu").forward(q, kv, kv, cache, meta, 1.0)


@needs_kernel
def test_the_kernel_loads():
    """Skips like the kernel's other tests where it cannot build, except under `make test`."""
    assert cpu_extension.available() is None


def test_a_failed_build_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEETSERVE_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(ExtensionUnavailable, match="false failed"):
        cpu_extension.build()
    assert not list(tmp_path.rglob("*.so"))


# A stand-in for g++: logs its call, writes its -o file, and exits with FAKE_CXX_EXIT. It then
# waits (up to 10 s) for a second call to be logged, so that two unlocked builds overlap
# whatever the machine's speed; under the lock there is no second call and it waits it out.
FAKE_CXX = """#!{python}
import os, sys, time
log = os.environ["FAKE_CXX_LOG"]
with open(log, "a") as f:
    f.write("call\\n")
with open(sys.argv[sys.argv.index("-o") + 1], "w") as f:
    f.write("not a library")
deadline = time.monotonic() + float(os.environ.get("FAKE_CXX_WAIT", "0"))
while time.monotonic() < deadline and len(open(log).readlines()) < 2:
    time.sleep(0.05)
sys.exit(int(os.environ.get("FAKE_CXX_EXIT", "0")))
"""


@pytest.fixture
def fake_cxx(monkeypatch, tmp_path) -> Path:
    """The build dir (under tmp_path) that `build()` uses with the fake compiler; its calls
    are logged in tmp_path / "calls"."""
    cxx = tmp_path / "fake-cxx"
    cxx.write_text(FAKE_CXX.format(python=sys.executable))
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FAKE_CXX_LOG", str(tmp_path / "calls"))
    monkeypatch.setenv("FLEETSERVE_BUILD_DIR", str(tmp_path / "build"))
    return tmp_path / "build"


def test_the_build_dir_comes_from_the_environment(fake_cxx):
    ext = cpu_extension.build()
    assert ext.path.is_relative_to(fake_cxx) and ext.path.read_text() == "not a library"


def test_a_failed_compile_leaves_no_temporary_file(fake_cxx, monkeypatch):
    monkeypatch.setenv("FAKE_CXX_EXIT", "1")
    with pytest.raises(ExtensionUnavailable, match="failed"):
        cpu_extension.build()
    assert list(fake_cxx.rglob("*.tmp")) == []


def test_what_a_killed_compile_left_is_cleared(fake_cxx):
    folder = fake_cxx / cpu_extension._key(cpu_extension.FLAG_SETS[0])
    folder.mkdir(parents=True)
    (folder / "fleetserve_cpu.4242.tmp").write_text("half a library")
    cpu_extension.build()
    assert list(folder.glob("*.tmp")) == []


def test_replicas_starting_together_compile_once(fake_cxx, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_CXX_WAIT", "10")
    code = "from fleetserve.attention import cpu_extension; print(cpu_extension.build().path)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", code]
    children = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE) for _ in range(2)]
    paths = {child.communicate(timeout=120)[0].decode().strip() for child in children}
    assert all(child.returncode == 0 for child in children)
    assert len(paths) == 1
    assert (tmp_path / "calls").read_text().count("call") == 1


# Calls the kernel must refuse. Each is run in one child process (a missing check corrupts the
# heap, which would take pytest down); the child prints one line per call as it goes.
BAD_CALLS = {
    "negative_query_start": ("query_start_loc\\[0\\] must be >= 0", "qsl=[-4, 0]"),
    "decreasing_query_start": (
        "non-decreasing",
        "qsl=[0, 3, 1]; lens=[3, 3]; bt=torch.tensor([[1], [2]])",
    ),
    "rows_past_q": ("query_start_loc ends at 5", "qsl=[0, 5]; lens=[5]"),
    "seq_len_below_q_len": ("shorter than its 4 query rows", "lens=[3]"),
    "seq_len_past_block_table": ("too short", "lens=[9]"),
    "no_such_sequence": ("no sequence 1", "seqs=[1]"),
    "block_tables_not_int64": ("block_tables: int64", "bt=bt.int()"),
    "block_tables_not_cpu": ("", "bt=bt.to('meta')"),
    "q_not_contiguous": ("contiguous", "q=q.transpose(0, 1).contiguous().transpose(0, 1)"),
    "out_other_dtype": ("one dtype", "out=out.double()"),
}

_CHILD = """
import sys, torch
from fleetserve.attention import cpu_extension
cpu_extension.load()
for name, change in [{calls}]:
    out, q = torch.zeros(4, 2, 8), torch.randn(4, 2, 8)
    kv, bt = torch.randn(2, 2, 4, 4, 8), torch.tensor([[1, 2]])
    qsl, lens, seqs = [0, 4], [4], [0]
    exec(change)
    try:
        torch.ops.fleetserve.paged_attention(out, q, kv, bt, qsl, lens, seqs, 0.125)
        print(name, "ACCEPTED", flush=True)
    except RuntimeError as exc:
        print(name, "refused:", str(exc).replace(chr(10), " "), flush=True)
"""


@pytest.fixture(scope="module")
def refusals() -> dict[str, str]:
    """{call name: what the child printed for it}; a call missing is one the child died on."""
    calls = ", ".join(f"({name!r}, {change!r})" for name, (_, change) in BAD_CALLS.items())
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD.format(calls=calls)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    lines["_exit"] = f"exit {proc.returncode}: {proc.stderr[-500:]}"
    return lines


@needs_kernel
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_kernel_refuses_a_bad_call_without_crashing(refusals, name):
    pattern, _ = BAD_CALLS[name]
    assert name in refusals, f"the child died before answering: {refusals['_exit']}"
    assert refusals[name].startswith("refused:"), refusals[name]
    assert re.search(pattern, refusals[name]), refusals[name]


def no_compiler(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment of a child process on a machine where the kernel cannot compile."""
    clean = {k: v for k, v in os.environ.items() if k != "FLEETSERVE_REQUIRE_TOOLS"}
    build_dir = str(tmp_path / "build")
    return {**clean, "CXX": "false", "FLEETSERVE_BUILD_DIR": build_dir, **env}


@pytest.mark.parametrize(("require", "outcome"), [("", "1 skipped"), ("1", "1 failed")])
def test_kernel_tests_fail_under_make_test_where_it_cannot_build(tmp_path, require, outcome):
    env = no_compiler(tmp_path, FLEETSERVE_REQUIRE_TOOLS=require, PYTHONPATH=str(ROOT))
    test = "tests/test_attention_cpu.py::test_kernel_rejects_a_block_id_outside_the_cache"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in proc.stdout, proc.stdout[-2000:]


def test_make_ext_fails_where_the_kernel_cannot_build(tmp_path):
    stamp = tmp_path / "venv-installed"  # stands for .venv/.installed: nothing gets installed
    stamp.touch()
    argv = ["make", "--no-print-directory", "ext", f"STAMP={stamp}", f"PY={sys.executable}"]
    argv.append(f"EXT_STAMP={tmp_path / 'built'}")
    env = no_compiler(tmp_path, PYTHONPATH=str(ROOT))
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "false failed" in proc.stderr
    assert not (tmp_path / "built").exists()


@needs_kernel
def test_q_k_v_as_views_into_one_qkv_row():
    """The model hands q, k, v over as views into the fused projection's rows; the kernel
    reads them in place and writes the same cache and output as for copies."""
    torch.manual_seed(11)
    specs = [SeqSpec(5, 1, [1]), SeqSpec(9, 1, [3, 2]), SeqSpec(3, 4, [4])]
    meta = build_attention_metadata(specs, 8)
    n, heads, kv_heads, d = meta.query_start_loc[-1], 6, 2, 16
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d).bfloat16()
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.view(n, heads, d), k.view(n, kv_heads, d), v.view(n, kv_heads, d)
    cache = torch.randn(2, kv_heads, 5, 8, d).bfloat16()
    want, want_cache = run_backend(
        "cpu", q.contiguous(), k.contiguous(), v.contiguous(), cache, meta, 0.25
    )
    got, got_cache = run_backend("cpu", q, k, v, cache, meta, 0.25)
    assert torch.equal(got_cache, want_cache)
    assert torch.equal(got, want)


@needs_kernel
def test_write_kv_rejects_a_slot_outside_the_cache():
    cache = torch.zeros(2, 1, 2, 4, 8)
    k = torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.fleetserve.write_kv(cache, k, k, torch.tensor([8]))
