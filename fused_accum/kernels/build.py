"""Building and loading the compiled ops in csrc/.

The CPU library is built just in time with ninja on first use unless ``setup.py`` built it ahead
of time (``FUSED_ACCUM_BUILD_EXT=1``).  The CUDA library is built the same way where torch has
CUDA.  A failed build is remembered with its message: ``backend="auto"`` then falls back, and
``backend="extension"`` raises with it.  The gradient collector (``csrc/autograd/``, C++ hooks
on autograd's gradient accumulators) is a Python module built the same way; without it
the gradient hooks run in Python.

Each just-in-time build has a directory of its own under torch's extensions root
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions/py<version>_<accelerator>``),
named after the extension and a short hash of its sources and headers, its flags, the compiler,
and the Python and torch versions (:func:`build_directory`): checkouts, venvs and torch versions
that share the root never rebuild each other's extensions, a changed header builds anew, and the
same source builds once wherever it lies (the sources and headers are copied into the directory,
in csrc/'s layout, and compiled from there).  A build holds an ``fcntl.flock`` on
``fused_accum.lock`` in its directory from start to end.  The kernel releases it when the process
dies however it dies, so torch's own ``lock`` file (``torch.utils.file_baton``), which a killed
build leaves behind and on which torch would wait forever, is stale whenever it is found under
the flock, and is removed.  An interrupted build (Ctrl-C, or ninja stopped by a signal) raises
KeyboardInterrupt rather than falling back.  First use says on stderr what it builds, where, and
how long it took.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from . import schemas

_PACKAGE = Path(__file__).resolve().parents[1]
_lock = threading.Lock()
_loaded: dict[str, str | None] = {}   # device type -> None when loaded, else the error


def csrc_dir() -> Path:
    """csrc/ of a source checkout, or the copy setup.py puts inside an installed package."""
    for candidate in (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise FileNotFoundError(f"csrc/ not found next to {_PACKAGE}")


def cpu_flags() -> list[str]:
    # -fopenmp: at::parallel_for is inline over `omp parallel` in torch's OpenMP builds, so
    # without it the kernels run on one thread (libgomp.so.1 resolves to the copy torch loaded);
    # it also honours the kernels' `omp simd` loops.  -fno-math-errno: sqrt needs no errno
    # branch, so the Adam loop vectorizes; results are the same.  -ffp-contract=off: the fp16
    # conversions rely on separately rounded products.  Never -ffast-math: it would break the
    # non-finite checks and torch's rounding.
    flags = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp", "-ffp-contract=off"]
    arch = os.environ.get("FUSED_ACCUM_CPU_ARCH", "native")   # "" for the compiler's default
    if arch:
        flags.append(f"-march={arch}")
    return flags


# Machine code for the GPUs the kernels were written for, and PTX of the newest, which the driver
# compiles for later architectures (sm_100, sm_120) on first use.
CUDA_TARGETS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90"]


def cuda_flags() -> list[str]:
    # USE_CUDA declares aoti_torch_get_current_cuda_stream in the stable ABI's shim (torch < 2.13).
    # --fmad=false: every product is rounded before it is added, as the reference (and the CPU
    # build's -ffp-contract=off, and Triton's enable_fp_fusion=False) rounds it, so backends agree
    # bit for bit and a checkpoint can move between them.
    return ["-O3", "-std=c++17", "-lineinfo", "-DUSE_CUDA", "--fmad=false", *CUDA_TARGETS]


HEADER_SUFFIXES = (".h", ".cuh")
INCLUDE_DIR = "include"   # csrc/include: headers shared by the CPU and CUDA kernels


def extension_files(src: Path, part: str, suffix: str,
                    shared: bool = True) -> tuple[list[Path], list[Path]]:
    """The sources of one extension, every ``*<suffix>`` file in ``src/<part>``, and the headers
    they may include: those of ``src/<part>`` and, if ``shared``, of ``src/include``."""
    sources = sorted((src / part).glob(f"*{suffix}"))
    folders = (src / part, src / INCLUDE_DIR) if shared else (src / part,)
    headers = sorted(path for folder in folders if folder.is_dir()
                     for path in folder.rglob("*") if path.suffix in HEADER_SUFFIXES)
    return sources, headers


def _prebuilt(device_type: str) -> Path | None:
    spec = importlib.util.find_spec(f"fused_accum._C_{device_type}")
    return Path(spec.origin) if spec and spec.origin else None


def extensions_root() -> Path:
    """The directory the just-in-time builds go under: torch's choice, made the same way."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils import cpp_extension
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(cpp_extension.get_default_build_root()) / f"{python}_{accelerator}"


def _cpu_identity() -> str:
    # -march=native compiles for this CPU: a home directory shared by machines with other CPUs
    # must not hand them this build (it would stop on an illegal instruction).
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return repr(sorted(found.items())) if found else platform.processor()


def _relative(path: Path, root: Path | None) -> str:
    """Where a copy of ``path`` goes in a build directory: its path under ``root`` (csrc/'s
    layout, so that the includes between files resolve there), or its name without a root."""
    return path.relative_to(root).as_posix() if root is not None else path.name


def build_directory(name: str, sources: list[Path], options: dict, headers: list[Path] = (),
                    root: Path | None = None) -> Path:
    """``<extensions root>/<name>_<hash>``: the hash of the sources' and headers' paths (under
    ``root``, else names) and contents, the build options, the compiler, and the Python and
    torch versions."""
    digest = hashlib.sha256()
    for source in [*sources, *headers]:
        digest.update(_relative(source, root).encode() + b"\0" + source.read_bytes() + b"\0")
    flags = [str(flag) for value in options.values() if isinstance(value, (list, tuple))
             for flag in value]
    identity = [repr(sorted(options.items())), os.environ.get("CXX", "c++"),
                sys.implementation.cache_tag, getattr(sys, "abiflags", ""), platform.machine(),
                torch.__version__, str(torch.version.git_version), str(torch.version.cuda),
                str(torch.version.hip)]
    if any(source.suffix == ".cu" for source in sources):
        from torch.utils import cpp_extension
        identity.append(str(cpp_extension.CUDA_HOME))
    if "-march=native" in flags:
        identity.append(_cpu_identity())
    digest.update("\0".join(identity).encode())
    return extensions_root() / f"{name}_{digest.hexdigest()[:10]}"


LOCK_NAME = "fused_accum.lock"   # the flock; torch's own lock file is "lock"


@contextlib.contextmanager
def _exclusive(directory: Path, what: str):
    """Hold an flock on ``directory/fused_accum.lock``; on entry, remove torch's ``lock`` if a
    dead build left one.  Yields whether it did."""
    try:
        import fcntl
    except ImportError:   # not POSIX: torch's lock alone, as before
        yield False
        return
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            started = time.monotonic()
            said = None
            while True:
                waited = time.monotonic() - started
                if said is None or waited - said >= 60:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    print(f"fused_accum: waiting for process {holder}, which is building or "
                          f"checking {what} in {directory}"
                          + (f" (waited {waited:.0f} s)" if said is not None else ""),
                          file=sys.stderr, flush=True)
                    said = waited
                time.sleep(0.2)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # Every build in this directory holds the flock while torch's lock exists: one found now
        # was left by a build that died (SIGKILL, a closed terminal, a job's time limit), and
        # torch would wait on it forever.
        stale = directory / "lock"
        found = stale.exists()
        if found:
            stale.unlink(missing_ok=True)
            print(f"fused_accum: removed the lock file an interrupted build of {what} left in "
                  f"{directory}", file=sys.stderr, flush=True)
        yield found
    finally:
        os.close(fd)   # releases the flock


def _interrupted(exc: BaseException) -> bool:
    """Whether a build failed because ninja was stopped by a signal (Ctrl-C where the terminal's
    SIGINT reached ninja but this process ignores SIGINT, SIGTERM or SIGHUP to the group)."""
    return "interrupted by user" in str(exc)


def jit_load(name: str, what: str, sources: list[Path], duration: str = "about a minute", *,
             headers: list[Path] = (), root: Path | None = None,
             include_dirs: list[str] = (), **options):
    """``torch.utils.cpp_extension.load`` in a directory of its own (:func:`build_directory`),
    under an flock that clears a dead build's lock, with a line on stderr before and after a
    build.  ``what`` names the extension in those lines.  The sources and ``headers`` are copied
    there in their layout under ``root`` (flat without one); ``include_dirs``, relative to
    ``root``, are put on the include path as their copies."""
    from torch.utils import cpp_extension
    sources = [Path(s) for s in sources]
    headers = [Path(h) for h in headers]
    root = Path(root) if root is not None else None
    hashed = {**options, "include_dirs": list(include_dirs)} if include_dirs else options
    directory = build_directory(name, sources, hashed, headers, root)
    module_name = directory.name
    directory.mkdir(parents=True, exist_ok=True)
    if include_dirs:
        options = {**options, "extra_include_paths": [
            *options.get("extra_include_paths", []), *(str(directory / d) for d in include_dirs)]}
    with _exclusive(directory, what) as was_interrupted:
        copies = []
        for file in [*sources, *headers]:   # built from a copy: its path, so ninja's commands,
            copy = directory / _relative(file, root)   # never change
            text = file.read_bytes()
            if not copy.exists() or copy.read_bytes() != text:
                copy.parent.mkdir(parents=True, exist_ok=True)
                partial = copy.with_name(f".{copy.name}.{os.getpid()}")
                partial.write_bytes(text)
                os.replace(partial, copy)
            if file in sources:
                copies.append(str(copy))
        library = directory / f"{module_name}{getattr(cpp_extension, 'LIB_EXT', '.so')}"
        announced = was_interrupted or not library.exists()
        if announced:
            print(f"fused_accum: first use: building {what} in {directory} ({duration}; later "
                  "runs reuse it)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = cpp_extension.load(name=module_name, sources=copies,
                                        build_directory=str(directory),
                                        verbose=bool(os.environ.get("FUSED_ACCUM_VERBOSE")),
                                        **options)
        except RuntimeError as exc:
            if _interrupted(exc):
                raise KeyboardInterrupt(f"the build of {what} in {directory} was interrupted") \
                    from exc
            raise
        seconds = time.perf_counter() - start
        if announced or seconds > 2:   # a cached load takes milliseconds
            print(f"fused_accum: built {what} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return result


def _build(device_type: str) -> None:
    prebuilt = _prebuilt(device_type)
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
        return
    src = csrc_dir()
    if device_type == "cpu":
        sources, headers = extension_files(src, "cpu", ".cpp")
        jit_load("fused_accum_cpu", "the CPU extension (compiled ops)", sources,
                 headers=headers, root=src, include_dirs=[INCLUDE_DIR],
                 extra_cflags=cpu_flags(), extra_ldflags=["-fopenmp"], is_python_module=False)
    else:
        sources, headers = extension_files(src, "cuda", ".cu")
        jit_load("fused_accum_cuda", "the CUDA extension (compiled ops)", sources,
                 duration="a few minutes", headers=headers, root=src, include_dirs=[INCLUDE_DIR],
                 extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=cuda_flags(),
                 is_python_module=False)


def load(device_type: str) -> str | None:
    """Load the compiled ops for ``device_type`` ("cpu" or "cuda"); None, or why they cannot."""
    with _lock:
        if device_type not in _loaded:
            schemas.define()
            if device_type == "cuda" and not torch.cuda.is_available():
                _loaded[device_type] = "torch has no CUDA device here"
            elif device_type not in ("cpu", "cuda"):
                _loaded[device_type] = f"no compiled ops for {device_type} devices"
            else:
                try:
                    _build(device_type)
                    _loaded[device_type] = None
                except Exception as exc:   # kept as the reason; "auto" falls back on it
                    _loaded[device_type] = f"build failed: {type(exc).__name__}: {exc}"
        return _loaded[device_type]


_collector: list = []   # [module or None, error or None] once tried


def load_collector():
    """The gradient collector module, or (None, why it cannot be built)."""
    with _lock:
        if not _collector:
            try:
                spec = importlib.util.find_spec("fused_accum._C_collector")
                if spec is not None and spec.origin:
                    module = importlib.import_module("fused_accum._C_collector")
                else:
                    src = csrc_dir()
                    sources, headers = extension_files(src, "autograd", ".cpp", shared=False)
                    module = jit_load("fused_accum_collector", "the gradient collector", sources,
                                      headers=headers, root=src,
                                      extra_cflags=["-O2", "-std=c++17"], is_python_module=True)
                _collector.extend([module, None])
            except Exception as exc:
                _collector.extend([None, f"build failed: {type(exc).__name__}: {exc}"])
        return _collector[0], _collector[1]
