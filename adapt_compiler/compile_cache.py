"""Warm starts: the compile caches of a module's graphs saved next to its adapter, and loaded again.

`m.save_adapter(dir, compile_cache=True)` writes more files into a PEFT directory:

    compile_cache.bin      torch.compiler.save_cache_artifacts(): Inductor's FX-graph cache entries
                           (the generated code of each compiled graph; on CUDA with the Triton kernels
                           bundled) and AOTAutograd's cache entries (the forward/backward split), plus
                           Dynamo's automatic-dynamic profile when it has one
    compile_cache.kernels  CPU only: a zip of the C++ kernels' shared objects those graphs load (torch
                           does not bundle them, so without this a warm start still runs the C++
                           compiler for every kernel: most of a CPU compile), and Inductor's
                           vector-ISA probe libraries (~8 s of C++ compiles per fresh cache dir)
    compile_cache.json     our key: what the graphs were compiled for, and the files' checksums; and
                           the correctness guard's verdicts on the graphs it checked (reused on a warm
                           start only for the identical compiled code: lowering/guard.py)

`ac.compile(model, dir, compile_cache=True)` loads the .bin with torch.compiler.load_cache_artifacts
before anything is compiled, if and only if the key computed for the new module equals the saved
one; the first step then finds its graphs in Inductor's and AOTAutograd's caches. Every decision is
a report() line ("compile cache: loaded ..." / "... ignored: <why>"), never an exception: a cache
only makes the first step faster, so a bad one must not stop a run.

Why a key of our own, when Inductor's and AOTAutograd's cache keys are content-addressed (a hash of
the graph, the inputs' metadata, torch's version and the compile config) and a stale artifact is
therefore normally just a miss: (1) the artifacts are pickles holding generated Python code, and a
key that is checked before a single byte is unpickled keeps files made for something else (another
torch, another model) from being unpickled at all; (2) it makes the decision visible with a reason
(a silent miss looks like a cache that "does not work"); (3) it is one more guard against a torch
cache key that misses an input (our graphs depend on our own pass code, which Inductor only sees
through the graph it produces). The key changes with: torch's, transformers' and Python's versions,
the source of every adapt_compiler module that shapes a graph (capture, passes, lowering, ...;
hashed per part so the reason names the part; finer than the package version, which a development
checkout does not bump), the adapters' PEFT configs (method,
rank, targets, options) and which are active, the compile options (lowering, merged, memory budget,
pool), and the base model's class, config, and parameter/buffer names, shapes, dtypes and devices.

On CPU torch's artifacts hold each kernel's C++ source, not its shared object; Inductor looks for
`<cache dir>/<key[1:3]>/<key>[.main].so` (key: a hash of the source and the compiler command line,
vector ISA flags included) and builds it only when it is missing. So the .so files of the kernels
this process loaded (the keys in Inductor's C++ code caches) are saved, and restored into this
process's cache dir on load, under the same content-addressed names: a kernel for another source,
ISA or flag set has another name and is simply not found. The key adds the machine and its vector
ISA, so kernels built for another CPU are not even unpacked.

torch records artifacts per process, not per compiled function (a backward graph compiles lazily,
inside loss.backward(), outside any call of ours), so the .bin holds every artifact this process
recorded: this module's graphs and any other torch.compile in the process. The extra entries cost
file size only; being content-addressed they are never served for another graph.

Loading is opt-in (compile_cache=True on ac.compile): the .bin holds pickles and generated code that
runs at the first step, and adapter directories travel (the Hub); a directory whose cache is not
loaded says so in report(). Only adapter weights in .safetensors are read without asking.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import platform
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from . import checkpoint
from .errors import AdapterError

CACHE_NAME = "compile_cache.bin"
KERNELS_NAME = "compile_cache.kernels"
KEY_NAME = "compile_cache.json"
FORMAT = 1
_KERNEL_PATH = re.compile(r"[a-z0-9]{2}/c[a-z0-9]{51}(\.main)?\.so")  # Inductor's names, nothing else unpacked
_ROOT = Path(__file__).parent
# package parts whose source does not shape a compiled graph (file formats, CLI, reports)
_NOT_GRAPH = ("formats", "commands", "cli.py", "report.py", "progress.py", "compile_cache.py")


class CompileCacheWarning(UserWarning):
    """A compile cache next to an adapter was not loaded (the reason is in the message and in report())."""


def check_flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterError(f"{where}: compile_cache={value!r} must be True or False.")
    return value


# -- the key -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def code_hashes() -> dict[str, str]:
    """sha256 (16 hex digits) of adapt_compiler's graph-shaping source, per part: each subpackage
    (passes = the adapter methods, lowering, quant, integrations) and "core" (the top-level modules)."""
    parts: dict[str, hashlib._Hash] = {}
    for path in sorted(_ROOT.rglob("*.py")):
        rel = path.relative_to(_ROOT)
        if rel.parts[0] in _NOT_GRAPH:
            continue
        part = rel.parts[0] if len(rel.parts) > 1 else "core"
        h = parts.setdefault(part, hashlib.sha256())
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return {part: h.hexdigest()[:16] for part, h in sorted(parts.items())}


def _json(value):
    """A JSON-normal copy (tuples -> lists, dict keys sorted, other objects -> str) so keys compare."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _model_part(table) -> dict:
    """The base model as the graphs see it: its class and config, and the frozen tensors the graphs read
    (the module's own copies: after `m.to(...)` they, not the user's model, have the new dtype/device),
    plus the adapter tensors' dtypes and devices."""
    model = table.model
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    if isinstance(config, dict):  # where the weights came from does not shape the graph
        config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    tensors = sorted((n, tuple(t.shape), str(t.dtype), str(t.device)) for n, t in table.frozen.items())
    adapters = {(str(p.dtype), str(p.device)) for *_, p in table.tensors()}
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "config": _json(config),
            "tensors": hashlib.sha256(repr(tensors).encode()).hexdigest()[:16], "tensor_count": len(tensors),
            "dtypes": sorted({d for _, _, d, _ in tensors if "float" in d}),
            "devices": sorted({d for *_, d in tensors} | {d for _, d in adapters}),
            "adapter_dtypes": sorted({d for d, _ in adapters})}


def cache_key(table, options: dict) -> dict:
    """What the compiled graphs of a module over `table` depend on (see the module docstring)."""
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return _json({
        "torch": torch.__version__,
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu_isa": _vector_isa(),
        "transformers": transformers_version,
        "python": platform.python_version(),
        "code": code_hashes(),
        "adapters": {name: checkpoint.peft_config(table, name) for name in table.names()},
        "active": list(table.active),
        "options": options,
        "model": _model_part(table),
    })


def _vector_isa() -> str:
    """This CPU's vector ISA as ATen sees it (AVX2, AVX512, ...). Not Inductor's pick_vec_isa(): on a fresh
    cache dir that compiles its probe libraries (~8 s), which a warm start restores first."""
    return torch.backends.cpu.get_cpu_capability()


def _difference(saved: dict, now: dict) -> str:
    """The first key part that differs, said so a user knows what changed."""
    for part, what in (("torch", "torch"), ("transformers", "transformers"), ("python", "Python"),
                       ("machine", "a"), ("cpu_isa", "CPU vector ISA")):
        if saved.get(part) != now.get(part):
            return f"made for {what} {saved.get(part)}, this is {what} {now.get(part)}"
    if saved.get("code") != now.get("code"):
        old, new = saved.get("code") or {}, now.get("code") or {}
        changed = sorted(p for p in {*old, *new} if old.get(p) != new.get(p))
        return f"made by other adapt_compiler code (changed: {', '.join(changed)})"
    old, new = saved.get("adapters") or {}, now.get("adapters") or {}
    if list(old) != list(new):
        return f"made for adapters {list(old)}, this module has {list(new)}"
    for name in new:
        a, b = old[name], new[name]
        fields = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
        if fields:
            shown = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in fields[:3])
            return f"made for another spec of adapter {name!r} ({shown})"
    for part, what in (("active", "active adapters"), ("options", "compile options")):
        if saved.get(part) != now.get(part):
            return f"made for {what} {saved.get(part)}, this module has {now.get(part)}"
    old, new = saved.get("model") or {}, now.get("model") or {}
    if old.get("class") != new.get("class"):
        return f"made for a {old.get('class')}, this model is a {new.get('class')}"
    if old.get("config") != new.get("config"):
        a, b = old.get("config") or {}, new.get("config") or {}
        fields = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
        return "made for another model config (" + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in fields[:3]) + ")"
    for part, what in (("dtypes", "a model in"), ("devices", "a model on"), ("adapter_dtypes", "adapters in")):
        if old.get(part) != new.get(part):
            return f"made for {what} {old.get(part)}, this one is in {new.get(part)}"
    if old != new:
        return "made for a model with other parameter/buffer names or shapes"
    return "key differs"  # a part added by a later version


# -- save --------------------------------------------------------------------------------------
def files_to_save(table, options: dict, compiled: bool, verdicts: dict | None = None) -> dict[str, bytes]:
    """{file name: bytes} of the cache and its key, for checkpoint.save_adapter to stage with the adapter
    (written to temporary files and renamed with the rest: a failed save leaves no half-written cache).
    `verdicts`: graph fingerprint -> {"graph", "compared", "worst"} of each compiled graph the correctness
    guard passed in this process (lowering/guard.py), saved next to the key for a warm start to reuse.
    Raises AdapterError when there is nothing to save."""
    if options.get("lowering") == "eager":
        # refused, not a no-op: the user asked for a warm start this module cannot give
        raise AdapterError("save_adapter(compile_cache=True): this module uses lowering='eager', which compiles "
                           "nothing, so there is no compile cache to save. Use lowering='inductor' (or 'regional') "
                           "or drop compile_cache=True.")
    if not compiled:
        raise AdapterError("save_adapter(compile_cache=True): nothing compiled yet; run a step (a forward, and a "
                           "backward for training) first, then save, or drop compile_cache=True.")
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise AdapterError(
            "save_adapter(compile_cache=True): torch recorded no compile cache artifacts in this process (Inductor's "
            "FX-graph cache is off? TORCHINDUCTOR_FX_GRAPH_CACHE=0 or TORCHINDUCTOR_FORCE_DISABLE_CACHES=1); "
            "enable it or drop compile_cache=True.")
    data, info = saved
    counts = {kind: len(keys) for kind, keys in sorted(info.artifacts.items()) if keys}
    files = {CACHE_NAME: data}
    kernels = _cpp_kernels()
    if kernels:
        files[KERNELS_NAME] = kernels
        counts["cpp_kernels"] = len(zipfile.ZipFile(io.BytesIO(kernels)).namelist())
    key_file = {"format": FORMAT, "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in files.items()},
                "artifacts": counts, "key": cache_key(table, options),
                "verdicts": {fp: {**v, "status": "passed"} for fp, v in sorted((verdicts or {}).items())}}
    # the key last: an interrupted rename leaves an old key that does not match the new files' checksums
    return {**files, KEY_NAME: json.dumps(key_file, indent=1).encode()}


def _cpp_kernels() -> bytes | None:
    """A zip of the shared objects of the C++ kernels this process loaded (paths relative to Inductor's
    cache dir), or None when there are none (CUDA, or nothing compiled for CPU)."""
    from torch._inductor.codecache import CppCodeCache
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    keys, todo = set(), [CppCodeCache]
    while todo:  # the class and its subclasses (Python bindings, C++ wrapper) each keep their own cache
        cls = todo.pop()
        keys |= set(vars(cls).get("cache", {}))
        todo += cls.__subclasses__()
    root = Path(cache_dir())
    found = {p for key in keys for p in (root / key[1:3]).glob(f"{key}*.so")}
    found = sorted(p for p in found | _isa_probes(root) if _KERNEL_PATH.fullmatch(p.relative_to(root).as_posix()))
    if not found:
        return None
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for p in found:
            z.write(p, p.relative_to(root).as_posix())
    return out.getvalue()


def _isa_probes(root: Path) -> set[Path]:
    """The tiny libraries Inductor builds to find the CPU's vector ISA (cpu_vec_isa.check_build: one C++
    compile each, ~8 s CPU in all on a fresh cache dir, cached by existence like the kernels): the .so
    files whose .cpp is one of its probe sources."""
    from torch._inductor import cpu_vec_isa

    probes = {v.strip() for cls in vars(cpu_vec_isa).values() if isinstance(cls, type)
              for name, v in vars(cls).items() if name.endswith("_code") and isinstance(v, str)}
    out = set()
    for so in root.glob("??/c*.so"):
        cpp = so.with_suffix(".cpp")
        if not so.name.endswith(".main.so") and cpp.is_file() and cpp.stat().st_size < 4096:
            if cpp.read_text(errors="replace").strip() in probes:
                out.add(so)
    return out


def _restore_cpp_kernels(data: bytes) -> int:
    """Unpack the kernels into this process's Inductor cache dir, each atomically, never over an existing file."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root, n = Path(cache_dir()), 0
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        bad = [name for name in z.namelist() if not _KERNEL_PATH.fullmatch(name)]
        if bad:  # checked before anything is unpacked
            raise ValueError(f"unexpected entry {bad[0]!r} in {KERNELS_NAME}")
        for name in z.namelist():
            target = root / name
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(z.read(name))
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
            n += 1
    return n


# -- load --------------------------------------------------------------------------------------
def present(directory) -> bool:
    return any((Path(directory) / name).is_file() for name in (KEY_NAME, CACHE_NAME, KERNELS_NAME))


LOADED = "compile cache: loaded"  # how load()'s report line starts when the cache was loaded


def load(directory, table, options: dict, trusted: bool) -> str:
    """Load the cache in `directory` if its key matches; returns the report line saying what happened."""
    where = Path(directory)
    if not trusted:
        return (f"compile cache: {where} has one, not loaded (it holds pickled compiled code; pass "
                f"compile_cache=True to ac.compile to trust and load it)")
    why = _why_not(where, table, options)
    if why is None:
        data = (where / CACHE_NAME).read_bytes()
        try:
            kernels = (where / KERNELS_NAME).read_bytes() if (where / KERNELS_NAME).is_file() else None
            restored = _restore_cpp_kernels(kernels) if kernels is not None else 0
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as err:  # noqa: BLE001 - a cache must never stop a run
            why = f"it could not be loaded ({type(err).__name__}: {err})"
        else:
            if info is None:
                why = "torch could not read it (an artifact format of another torch build?)"
            else:
                counts = {kind: len(keys) for kind, keys in sorted(info.artifacts.items()) if keys}
                n = sum(counts.values())
                shown = ", ".join(f"{kind} {c}" for kind, c in counts.items())
                cpp = f", {restored} C++ kernels" if kernels is not None else ""
                table.verified = _verdicts(where)
                checked = f"; {len(table.verified)} guard verdicts" if table.verified else ""
                return f"{LOADED} {n} artifacts ({shown}{cpp}{checked}) from {where}"
    line = f"compile cache: {where / CACHE_NAME} ignored: {why}"
    warnings.warn(line, CompileCacheWarning, stacklevel=3)
    return line


def _verdicts(where: Path) -> dict:
    """The guard verdicts saved next to a key that matched: fingerprint -> record (well-formed ones only)."""
    try:
        saved = json.loads((where / KEY_NAME).read_text()).get("verdicts")
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for fp, v in (saved.items() if isinstance(saved, dict) else ()):
        if (isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{32}", fp) and isinstance(v, dict)
                and v.get("status") == "passed" and isinstance(v.get("compared"), int)
                and isinstance(v.get("worst"), (int, float)) and math.isfinite(v["worst"])):
            out[fp] = {**v, "source": str(where)}
    return out


def _why_not(where: Path, table, options: dict) -> str | None:
    """Why the cache in `where` must not be loaded for this module, or None."""
    if options.get("lowering") == "eager":
        return "lowering='eager' compiles nothing"
    import torch._inductor.config as inductor_config

    if not inductor_config.fx_graph_cache or inductor_config.force_disable_caches:
        return "Inductor's FX-graph cache is off in this process (TORCHINDUCTOR_FX_GRAPH_CACHE / FORCE_DISABLE_CACHES)"
    if not (where / KEY_NAME).is_file():
        return f"no {KEY_NAME} next to it (saved by hand? save with m.save_adapter(dir, compile_cache=True))"
    if not (where / CACHE_NAME).is_file():
        return f"{KEY_NAME} without its {CACHE_NAME}"
    try:
        saved = json.loads((where / KEY_NAME).read_text())
        if not isinstance(saved, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as err:
        return f"{KEY_NAME} is not readable JSON ({err})"
    if saved.get("format") != FORMAT:
        return f"key format {saved.get('format')!r}, this version reads {FORMAT}"
    sums = saved.get("sha256") if isinstance(saved.get("sha256"), dict) else {}
    for name in (CACHE_NAME, KERNELS_NAME):
        if name not in sums and name == KERNELS_NAME:
            continue
        if not (where / name).is_file():
            return f"{name} is missing ({KEY_NAME} lists it)"
        if hashlib.sha256((where / name).read_bytes()).hexdigest() != sums.get(name):
            return f"{name} does not match the checksum in {KEY_NAME} (corrupt, or from another save)"
    now = cache_key(table, options)
    if saved.get("key") != now:
        return _difference(saved.get("key") or {}, now)
    return None
