#!/usr/bin/env bash
# Shows, without a GPU and without installing anything, that the GPU pins of
# scripts/install_gpu.sh (and setup.py's [gpu] extra) resolve together with pip's resolver:
# `pip install --dry-run --ignore-installed --report` for Linux x86_64 wheels, Python 3.12 and 3.11.
#
# transformer-engine's torch extension (transformer-engine-torch) is an sdist whose setup.py
# needs a CUDA build of torch even to produce its metadata, so it cannot be resolved on a CPU
# machine; its declared requirements (PKG-INFO in the sdist) are resolved instead, together with
# everything else. The script also checks that every `from transformer_engine... import X` in
# megatron-core's sources names something that exists in transformer-engine's Python sources.
#
# Usage: bash scripts/check_gpu_pins.sh [OUTPUT.md]
#   default output: benchmarks/results/gpu_pins_resolve_<UTC date>.md
#   PYTHON: interpreter whose pip is used (default .venv/bin/python, else python3)
#   CHECK_PYTHON_VERSIONS: target Python versions (default "3.12 3.11")
# Needs network access to the package index (several GB are downloaded into pip's cache when the
# index serves no separate metadata files). Exit status 0 only if every target resolved to the pins.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/benchmarks/results/gpu_pins_resolve_$(date -u +%F).md}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cegppo-gpu-pins.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# the pins, read from the one place that defines them
pin() { sed -n "s/^$1=\"\([^\"]*\)\".*/\1/p" "$ROOT/scripts/install_gpu.sh" | head -1; }
export TORCH_VERSION="$(pin TORCH_VERSION)" VLLM_VERSION="$(pin VLLM_VERSION)" \
  VLLM_REQUIRES_TORCH="$(pin VLLM_REQUIRES_TORCH)" MEGATRON_CORE_VERSION="$(pin MEGATRON_CORE_VERSION)" \
  TE_VERSION="$(pin TE_VERSION)" TORCH_CUDA_MAJOR="$(pin TORCH_CUDA_MAJOR)"
for v in TORCH_VERSION VLLM_VERSION VLLM_REQUIRES_TORCH MEGATRON_CORE_VERSION TE_VERSION TORCH_CUDA_MAJOR; do
  [ -n "${!v}" ] || { echo "[check_gpu_pins] could not read $v from scripts/install_gpu.sh" >&2; exit 1; }
done

ROOT="$ROOT" OUT="$OUT" WORK="$WORK" PYVERS="${CHECK_PYTHON_VERSIONS:-3.12 3.11}" "$PY" - <<'PY'
import ast, datetime, email.parser, glob, json, os, re, shlex, subprocess, sys, zipfile
from pathlib import Path

root, out, work = Path(os.environ["ROOT"]), Path(os.environ["OUT"]), Path(os.environ["WORK"])
pyvers = os.environ["PYVERS"].split()
E = os.environ
pins = {"torch": E["TORCH_VERSION"], "vllm": E["VLLM_VERSION"], "megatron-core": E["MEGATRON_CORE_VERSION"],
        "transformer-engine": E["TE_VERSION"], f"transformer-engine-cu{E['TORCH_CUDA_MAJOR']}": E["TE_VERSION"]}
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
# pip takes --platform literally (no manylinux expansion): list glibc 2.17 ... 2.35 (Ubuntu 22.04).
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(35, 16, -1)] + ["manylinux2014_x86_64"]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
log = lambda m: print(f"[check_gpu_pins] {m}", flush=True)

def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return p.returncode, p.stdout, p.stderr

# ---- setup.py: install_requires + the [gpu] extra
sys.path.insert(0, str(root / "scripts"))
from setup_requirements import read_setup
consts, install_requires = read_setup(root / "setup.py")
gpu_extra = consts["GPU"]

# ---- transformer-engine-torch: the sdist's declared requirements
te_torch = f"transformer-engine-torch=={E['TE_VERSION']}"
log(f"reading {te_torch}'s declared requirements from its sdist")
tmp = work / "tmp"; tmp.mkdir()
rc, so, se = run(PIP + ["download", "--no-deps", "--no-binary=:all:", "--no-build-isolation", "--no-clean",
                        "-d", str(work / "dl"), te_torch], env={**os.environ, "TMPDIR": str(tmp)})
why_not = [l.strip() for l in (so + se).splitlines() if re.search(r"(Error|needs Torch|InvalidVersion)", l)]
pkg_info = sorted(glob.glob(str(tmp / "**" / "PKG-INFO"), recursive=True))
pkg_info = [p for p in pkg_info if "transformer" in p.lower() and "torch" in p.lower()]
te_torch_reqs, te_torch_meta_note = [], ""
if pkg_info:
    meta = email.parser.Parser().parsestr(Path(pkg_info[0]).read_text())
    te_torch_reqs = meta.get_all("Requires-Dist") or []
    te_torch_meta_note = (f"{meta['Name']} {meta['Version']} sdist PKG-INFO, Requires-Python {meta['Requires-Python']}")
else:
    why_not.append("the sdist could not be fetched and unpacked")
metadata_failure = "; ".join(dict.fromkeys(why_not[-3:])) or f"pip download exit {rc}"

# ---- the requirement set resolved
def strip_pytorch_extra(req):
    m = re.match(r"^(transformer[-_]engine)\[([^\]]*)\](.*)$", req)
    if not m:
        return req
    extras = [x for x in m.group(2).split(",") if x.strip() != "pytorch"]
    return m.group(1) + (f"[{','.join(extras)}]" if extras else "") + m.group(3)

reqs = list(dict.fromkeys([*install_requires, *[strip_pytorch_extra(r) for r in gpu_extra], *te_torch_reqs]))
(work / "requirements.txt").write_text("\n".join(reqs) + "\n")

results = {}
for pv in pyvers:
    report = work / f"report-{pv}.json"
    cmd = PIP + ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                 "--python-version", pv, "--only-binary=:all:"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["-r", str(work / "requirements.txt")]
    log(f"resolving for Python {pv} ...")
    t0 = datetime.datetime.now()
    rc, so, se = run(cmd)
    dt = (datetime.datetime.now() - t0).total_seconds()
    res = {"rc": rc, "seconds": round(dt), "cmd": cmd, "errors": [l for l in se.splitlines() if l.startswith("ERROR")]}
    if rc == 0 and report.exists():
        rep = json.loads(report.read_text())
        inst = {norm(i["metadata"]["name"]): i for i in rep["install"]}
        res["versions"] = {k: i["metadata"]["version"] for k, i in inst.items()}
        res["n"] = len(inst)
        vreq = [d for d in inst.get("vllm", {}).get("metadata", {}).get("requires_dist", [])
                if re.match(r"^(torch|torchvision|torchaudio)\s*[=<>!~ (]", d)]
        res["vllm_requires"] = vreq
        res["pip"] = rep.get("pip_version")
    results[pv] = res

# ---- megatron-core's TE imports vs transformer-engine's Python sources (static)
def fetch_wheel(spec, pv):
    d = work / ("w-" + re.sub(r"\W", "_", spec))
    rc, so, se = run(PIP + ["download", "--no-deps", "--only-binary=:all:", "--python-version", pv,
                            *sum((["--platform", p] for p in PLATFORMS), []), "-d", str(d), spec])
    whl = sorted(d.glob("*.whl")) if rc == 0 else []
    if not whl:
        return None
    x = d / "x"; zipfile.ZipFile(whl[0]).extractall(x)
    return x

static = {"ok": None}
mc = fetch_wheel(f"megatron-core=={E['MEGATRON_CORE_VERSION']}", pyvers[0])
te = fetch_wheel(f"transformer-engine=={E['TE_VERSION']}", pyvers[0])
if mc and te:
    def modfile(mod):
        p = te.joinpath(*mod.split("."))
        for c in (p.with_suffix(".py"), p / "__init__.py"):
            if c.exists():
                return c
    def defines(mod, name, depth=0):
        """name appears in mod's source, or in a module it star-imports (one level)."""
        mf = modfile(mod)
        if mf is None:
            return False
        src = mf.read_text()
        if re.search(rf"\b{re.escape(name)}\b", src):
            return True
        if depth == 0:
            for star in re.findall(r"^from\s+(\.?[\w.]+)\s+import\s+\*", src, re.M):
                base = mod if mf.name == "__init__.py" else mod.rsplit(".", 1)[0]
                sub = base + star if star.startswith(".") else star
                if defines(sub, name, 1):
                    return True
        return False
    missing, checked = {}, 0
    for f in (mc / "megatron").rglob("*.py"):
        try:
            t = ast.parse(f.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        parents = {c: p for p in ast.walk(t) for c in ast.iter_child_nodes(p)}
        for n in ast.walk(t):
            if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("transformer_engine"):
                guard, p = "unguarded", parents.get(n)
                while p is not None:
                    if isinstance(p, ast.Try):
                        guard = "inside try/except"; break
                    if isinstance(p, ast.If):
                        guard = "inside an if (version gate)"; break
                    p = parents.get(p)
                for a in n.names:
                    checked += 1
                    if modfile(f"{n.module}.{a.name}") or defines(n.module, a.name):
                        continue
                    missing.setdefault(f"{n.module}.{a.name}", set()).add(f"{f.relative_to(mc)}:{n.lineno}, {guard}")
    static = {"ok": True, "checked": checked, "missing": {k: sorted(v) for k, v in sorted(missing.items())}}
else:
    static = {"ok": False}

# ---- verdict
problems = []
for pv, r in results.items():
    if r["rc"] != 0:
        problems.append(f"Python {pv}: pip could not resolve the set ({'; '.join(r['errors'][-2:]) or 'exit ' + str(r['rc'])})")
        continue
    for name, want in pins.items():
        got = r["versions"].get(name)
        if got is None or got.split("+")[0] != want:
            problems.append(f"Python {pv}: {name} resolved to {got}, pinned {want}")
    if f"torch=={E['VLLM_REQUIRES_TORCH']}" not in [x.replace(" ", "") for x in r["vllm_requires"]]:
        problems.append(f"Python {pv}: vllm {E['VLLM_VERSION']} requires {r['vllm_requires']}, "
                        f"not torch=={E['VLLM_REQUIRES_TORCH']} as scripts/install_gpu.sh states")
if static["ok"]:
    for k, where in static["missing"].items():
        if any(w.endswith("unguarded") for w in where):
            problems.append(f"megatron-core imports {k} unguarded, and transformer-engine {E['TE_VERSION']} has no such name")
if E["TORCH_VERSION"] != E["VLLM_REQUIRES_TORCH"]:
    problems.append("TORCH_VERSION differs from VLLM_REQUIRES_TORCH in scripts/install_gpu.sh")

# ---- report
KEY = ["torch", "vllm", "megatron-core", "transformer-engine", f"transformer-engine-cu{E['TORCH_CUDA_MAJOR']}",
       "torchvision", "torchaudio", "triton", "transformers", "nvidia-cudnn-cu13", "nvidia-cudnn-frontend",
       "nvidia-nccl-cu13", "cuda-toolkit", "nvidia-cuda-nvcc", "flashinfer-python", "numpy", "sentencepiece",
       "math-verify", "onnx", "onnxscript", "pydantic", "einops", "nvdlfw-inspect"]
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
rc_cfg, cfg, _ = run(PIP + ["config", "list"])
pipver = run(PIP + ["--version"])[1].split(" from ")[0]
L = [f"# GPU pins: pip resolution check ({now[:10]})", "",
     f"Produced by `bash scripts/check_gpu_pins.sh` on {now}: a CPU-only Linux x86_64 machine, "
     f"{pipver}, target wheels for Linux x86_64 (glibc 2.17-2.35 tags), nothing installed.", "",
     "## Verdict", ""]
L += ([f"- FAILED: {p}" for p in problems] if problems else
      [f"- All pins resolve together for Python {', '.join(pyvers)}: torch {E['TORCH_VERSION']}, "
       f"vllm {E['VLLM_VERSION']}, megatron-core {E['MEGATRON_CORE_VERSION']}, transformer-engine "
       f"{E['TE_VERSION']} (core wheel cu{E['TORCH_CUDA_MAJOR']}) and the torch extension's declared requirements.",
       f"- vllm {E['VLLM_VERSION']}'s metadata requires: {', '.join(results[pyvers[0]]['vllm_requires'])}."])
L += ["", "## What was resolved", "",
      "`install_requires` and the `[gpu]` extra of setup.py, with `transformer-engine[...,pytorch]` replaced by "
      f"`transformer-engine[core_cu13]` plus the requirements declared by `{te_torch}`:", "", "```"] + reqs + ["```", "",
      "Command (per Python version; `<platforms>` = " + " ".join(f"--platform {p}" for p in PLATFORMS[:2]) +
      f" ... --platform {PLATFORMS[-1]}):", "", "```",
      "python -m pip install --dry-run --ignore-installed --report report.json \\",
      "    --python-version 3.12 --only-binary=:all: <platforms> -r requirements.txt", "```", ""]
L += ["| package | " + " | ".join(f"Python {pv}" for pv in pyvers) + " | pinned |", "|---|" + "---|" * (len(pyvers) + 1)]
for k in KEY:
    row = [results[pv].get("versions", {}).get(k, "-") for pv in pyvers]
    if any(v != "-" for v in row):
        L.append(f"| {k} | " + " | ".join(row) + f" | {pins.get(k, '')} |")
L += ["| (packages in the resolution) | " + " | ".join(str(results[pv].get("n", "-")) for pv in pyvers) + " | |",
      "| (resolver time, s) | " + " | ".join(str(results[pv]["seconds"]) for pv in pyvers) + " | |", ""]
L += ["## What could not be resolved here, and why", "",
      f"- `{te_torch}` (transformer-engine's torch extension) ships only as an sdist. Its setup.py imports "
      "torch and reads `torch.version.cuda` to choose its core-library requirement "
      f"(`transformer_engine_cu{{12,13}}`), so its metadata cannot be generated against this machine's CPU torch "
      f"(pip said: `{metadata_failure}`). Resolved instead: its declared requirements "
      f"({te_torch_meta_note or 'not found'}): `{'`, `'.join(te_torch_reqs) or '-'}`. On a GPU machine "
      "scripts/install_gpu.sh builds it with `--no-build-isolation` against the installed torch "
      "(TE's setup first tries a prebuilt wheel from its GitHub release; whether one exists for this torch was not checked).",
      "- Nothing here runs the stack: CUDA availability, the extension build, and megatron's "
      "`gpt_layer_specs.HAVE_TE` are checked by `bash scripts/install_gpu.sh` (or `--check`) on a GPU node.", ""]
L += ["## megatron-core's transformer-engine imports (static)", ""]
if static["ok"]:
    L.append(f"Every `from transformer_engine... import X` in megatron-core {E['MEGATRON_CORE_VERSION']}'s sources "
             f"({static['checked']} names) looked up in transformer-engine {E['TE_VERSION']}'s Python sources; "
             f"{len(static['missing'])} not found:")
    L.append("")
    L += [f"- `{k}` ({', '.join(v)})" for k, v in static["missing"].items()] or ["- none"]
    L += ["", "A name not found matters only where megatron imports it unguarded; a guarded import falls back "
          "(megatron-core keeps imports for older and newer TE layouts side by side). "
          "This is a static check of names, not of call signatures or behaviour."]
else:
    L.append("Not done: the megatron-core or transformer-engine wheel could not be downloaded.")
L += ["", "## pip configuration in effect", "", "```", (cfg.strip() or "(none)"), "```", ""]
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(L) + "\n")

for pv in pyvers:
    v = results[pv].get("versions", {})
    log(f"Python {pv}: " + (", ".join(f"{k} {v.get(k, '-')}" for k in KEY[:7]) if v else "NOT RESOLVED"))
log(f"transformer-engine-torch {E['TE_VERSION']}: not resolvable without a CUDA torch; declared requirements resolved: "
    + ", ".join(te_torch_reqs))
if static["ok"]:
    unguarded = sum(any(w.endswith("unguarded") for w in v) for v in static["missing"].values())
    log(f"megatron-core TE imports: {static['checked']} checked, {len(static['missing'])} not found in TE "
        f"{E['TE_VERSION']} ({unguarded} of them unguarded)")
log(f"wrote {out}")
if problems:
    for p in problems:
        log("FAILED: " + p)
    sys.exit(1)
log("ok: the GPU pins resolve together")
PY
