"""vit_lens.perf.keep_freed_memory (issue 17): glibc keeps the memory a dropped cache frees, so the next
run_with_cache reuses resident pages instead of page-faulting fresh ones; results stay bit-identical.

The setting is process-wide, so everything that applies it runs in a fresh subprocess (the test
process's allocator is left as it was)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vit_lens.perf as perf
from vit_lens.core.errors import InputError, InputTypeError

REPO = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(perf.glibc_version() is None, reason="mallopt is glibc's (Linux); elsewhere a no-op")

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    sys.path.insert(0, "tests")
    from conftest import make_timm
    from vit_lens import HookedViT
    import vit_lens.perf as perf

    torch.set_num_threads(1)
    model = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", seed=0, depth=2, num_classes=10))
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def cached():
        a = faults()
        logits, cache = model.run_with_cache(x, return_cache_object=False)
        return logits, cache, faults() - a

    with torch.inference_mode():
        logits0, cache0, _ = cached()  # default allocator: the reference results
        cache_bytes = sum(v.untyped_storage().nbytes() for v in cache0.values())
        kept_before = perf.freed_memory_kept()
        status = perf.keep_freed_memory()
        same, kept_faults = True, []
        for i in range(4):  # each cache is dropped before the next call, as in a loop over batches
            logits, cache, f = cached()
            same &= torch.equal(logits, logits0) and cache.keys() == cache0.keys() \
                and all(torch.equal(cache[k], cache0[k]) for k in cache0)
            if i:  # the first kept call may still grow the heap
                kept_faults.append(f)
            del logits, cache
        released = perf.release_freed_memory()
        back = perf.keep_freed_memory(False)
    print(json.dumps(dict(applied=status.applied, note=status.note, mmap=status.mmap_threshold,
                          trim=status.trim_threshold, kept_before=kept_before, same=same,
                          pages=cache_bytes // 4096, kept_faults=kept_faults, released=released,
                          back_applied=back.applied, kept_after=perf.freed_memory_kept())))
    """
)


@glibc_only
def test_kept_memory_is_reused_and_results_are_bit_identical():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["applied"] and out["mmap"] == perf.MMAP_THRESHOLD_MAX and out["trim"] is None, out
    assert "glibc" in out["note"]
    assert not out["kept_before"]  # a fresh process without MALLOC_* variables does not keep freed memory
    assert out["same"], "logits or cache changed with the allocator setting"
    # every cached tensor lives in pages the process already holds: far fewer faults than the cache has pages
    assert out["pages"] > 5000
    assert max(out["kept_faults"]) < 0.05 * out["pages"], out
    assert out["back_applied"] and not out["kept_after"]


def test_not_glibc_is_a_noop_that_says_so(monkeypatch):
    monkeypatch.setattr(perf, "_libc", lambda: None)
    s = perf.keep_freed_memory()
    assert not s.applied and s.mmap_threshold is None and "not glibc" in s.note
    assert perf.glibc_version() is None and not perf.freed_memory_kept() and not perf.release_freed_memory()


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(mmap_threshold=perf.MMAP_THRESHOLD_MAX + 1), InputError),  # glibc would refuse it
        (dict(mmap_threshold=0), InputError),
        (dict(trim_threshold=2**31), InputError),  # mallopt takes an int
        (dict(mmap_threshold=True), InputTypeError),
        (dict(trim_threshold=1.5), InputTypeError),
        (dict(keep_large_blocks="yes"), InputTypeError),
    ],
)
def test_out_of_range_thresholds_are_refused_before_anything_is_set(monkeypatch, kwargs, err):
    monkeypatch.setattr(perf, "_libc", lambda: pytest.fail("checked after the C library was touched"))
    with pytest.raises(err, match="threshold|keep_large_blocks"):
        perf.keep_freed_memory(**kwargs)


def test_environment_variables_count_as_kept(monkeypatch):
    if perf.glibc_version() is None:
        pytest.skip("glibc only")
    monkeypatch.setattr(perf, "_state", {"kept": False})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    assert perf.freed_memory_kept()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert not perf.freed_memory_kept()


@pytest.mark.parametrize("env, kept", [(None, True), ("0", False)])
def test_the_vit_lens_command_keeps_freed_memory_unless_told_not_to(env, kept):
    """``vit-lens`` / ``python -m vit_lens`` run :func:`cli.main` in a process that keeps freed memory
    (a command is one job: batch after batch reuses the pages); VIT_LENS_KEEP_FREED_MEMORY=0 turns it off."""
    import subprocess
    import sys

    from vit_lens import perf

    if perf.glibc_version() is None:
        pytest.skip("not glibc: the switch is a no-op here")
    code = ("import sys; from vit_lens import cli, perf\n"
            "cli.main = lambda argv=None: print('kept', perf.freed_memory_kept()) or 0\n"
            "sys.exit(cli.console_main())")
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "VIT_LENS_KEEP_FREED_MEMORY"}
    if env is not None:
        e["VIT_LENS_KEEP_FREED_MEMORY"] = env
    out = subprocess.run([sys.executable, "-c", code], env={**e, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"kept {kept}"
    # the console script and python -m vit_lens both go through console_main
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vit-lens"] == "vit_lens.cli:console_main"
    assert "sys.exit(console_main())" in (REPO / "vit_lens" / "__main__.py").read_text()


LARGE_CHILD = textwrap.dedent(
    """
    import json, resource
    import torch
    import vit_lens.perf as perf

    def faults_of_a_fresh_block(mib=64):  # one tensor above glibc's largest mmap threshold (32 MiB)
        a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(mib * 2**18).fill_(1.0)  # float32: 2**18 per MiB
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a
        del t
        return f

    out = {}
    for keep_large in (False, True):
        status = perf.keep_freed_memory(keep_large_blocks=keep_large)
        # the first blocks grow the heap: a freed block is a few bytes short of the next aligned
        # (posix_memalign) request until freed neighbours have merged; measured here: 4-5 blocks
        for _ in range(8):
            faults_of_a_fresh_block()
        out[str(keep_large)] = dict(applied=status.applied, large=status.large_blocks_kept, note=status.note,
                                    faults=[faults_of_a_fresh_block() for _ in range(3)])
    perf.keep_freed_memory(False)
    print(json.dumps(out))
    """
)


@glibc_only
def test_blocks_above_the_largest_mmap_threshold_are_kept_too():
    """A 64 MiB block is above what any mmap threshold can keep: it used to be unmapped on free and
    faulted in again (16k pages) on every allocation; with keep_large_blocks (the default) it comes
    from the heap and its pages are reused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", LARGE_CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    pages = 64 * 2**20 // 4096
    off, on = out["False"], out["True"]
    assert off["applied"] and not off["large"] and on["applied"] and on["large"], out
    assert "larger blocks from the heap too" in on["note"] and "larger blocks" not in off["note"]
    assert min(off["faults"]) > 0.9 * pages, out  # mmap-ed: every page faulted in again
    assert max(on["faults"]) < 0.02 * pages, out  # from the kept heap


def test_the_forward_frees_the_attention_output_and_the_pre_activation_when_timm_does():
    """HookedViT kept the attention output alive through the MLP and the MLP's pre-activation through
    its output projection: the ~40 MB they freed at the end of every block sat at the heap top, and
    glibc trimmed it there and page-faulted it in again in the next block (120k faults per ViT-Ti
    batch-32 forward after a dropped cache; timm's own 58-65k). timm frees both earlier. Checked by
    weak references: by the time the MLP's activation is hooked, both are gone."""
    import weakref

    import torch

    from conftest import make_timm
    from vit_lens import HookedViT

    model = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", seed=0, depth=2, num_classes=10))
    refs, alive = {}, {}

    def keep(name):
        def hook(t, hook):
            refs[name] = weakref.ref(t)
        return hook

    def check(at, names):
        def hook(t, hook):
            alive[at] = {n: refs[n]() is not None for n in names}
        return hook

    hooks = [("blocks.0.hook_attn_out", keep("attn_out")), ("blocks.0.mlp.hook_pre", keep("pre")),
             ("blocks.0.mlp.hook_post", check("mlp post", ["attn_out", "pre"])),
             ("blocks.0.hook_mlp_out", check("mlp out", ["attn_out", "pre"]))]
    with torch.inference_mode():
        model.run_with_hooks(torch.randn(2, 3, 224, 224), fwd_hooks=hooks)
    assert alive["mlp post"] == {"attn_out": False, "pre": False}, alive
    assert alive["mlp out"] == {"attn_out": False, "pre": False}, alive
