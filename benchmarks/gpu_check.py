"""GPU check: the compiled moment graph on CUDA, against its CPU results and timed against the plain model.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu    # dry run of the same steps on the CPU (no timing claims)

Steps, for an MLP 784-1024-1024-10 (ReLU) with every weight random (variance 1e-4):
1. the compiled torch module (``cm.program.module()``) moved to the GPU: its mean and variance against the CPU
   run, and its latency against the plain model on the same GPU (batch 1 and 256);
2. where onnxruntime-gpu is installed (``CUDAExecutionProvider``), the exported ONNX file on the CUDA provider with IO
   binding (``momentprop.OnnxRunner(path, "cuda")``): outputs against ONNX Runtime on the CPU, and latency against
   the plain model's ONNX file on the same provider.
3. the tests' LeNet-5 and small ResNet (``tests/oracles.py``) with every weight random (variance 1e-4), in diag mode
   and in full mode under the GLM (exact convolution maps): the compiled torch module on the GPU against the CPU,
   and its latency against the plain model at batch 256.
Exit status: 0 when every comparison is within tolerance, 1 when one is not, 2 when no CUDA device is available.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import momentprop as mp
from momentprop.errors import ProviderError

RTOL = 1e-3  # GPU matrix products and convolutions (TF32 off) against the CPU, relative to the largest magnitude


def median_ms(run: Callable[[], object], sync: Callable[[], None], repeats: int = 50) -> float:
    for _ in range(5):
        run()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def on_device(program: torch.export.ExportedProgram, device: torch.device) -> nn.Module:
    """The moment graph as a module on ``device``: torch.export's ``move_to_device_pass`` moves its parameters,
    buffers and constants and the device arguments of its ops (``module().to(device)`` would leave the metadata
    assertions of its casts on the CPU)."""
    from torch.export.passes import move_to_device_pass

    return move_to_device_pass(copy.deepcopy(program), device).module()  # the pass changes the program it gets


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def against_cpu(cm, moment: nn.Module, plain: nn.Module, x: torch.Tensor, device: torch.device, sync,
                repeats: int = 50) -> dict:
    """The compiled module on ``device`` against ``cm`` on the CPU, and both modules' latency on ``device``."""
    mean_cpu, var_cpu = cm(x)
    xd = x.to(device)
    with torch.no_grad():
        mean_dev, var_dev = (t.cpu() for t in moment(xd)[:2])
        errors = {"mean": relative(mean_dev, mean_cpu), "variance": relative(var_dev, var_cpu)}
        compiled_ms = median_ms(lambda: moment(xd), sync, repeats)
        plain_ms = median_ms(lambda: plain(xd), sync, repeats)
    return {"max_rel_error_vs_cpu": errors, "compiled_ms": compiled_ms, "plain_ms": plain_ms,
            "ratio": compiled_ms / plain_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda; 'cpu' for a dry run)")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}; "
              "torch.cuda.is_available() is False). Run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
              "or pass --device cpu for a dry run.", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # convolutions: cuDNN's own switch (TF32 put the ResNet's mean 1e-4 off)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    cm = mp.compile(model, 1e-4, (torch.randn(8, 784),), likelihood="classification")
    results: dict[str, object] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                  "torch": torch.__version__}
    ok = True

    # 1. the compiled torch module on the device
    moment = on_device(cm.program, device)
    plain = model.to(device)
    for batch in (1, 256):
        r = results[f"torch_batch{batch}"] = against_cpu(
            cm, moment, plain, torch.randn(batch, 784, generator=torch.Generator().manual_seed(batch)), device, sync)
        ok &= max(r["max_rel_error_vs_cpu"].values()) < RTOL
        print(f"torch {device} batch {batch}: error vs CPU {r['max_rel_error_vs_cpu']}; compiled "
              f"{r['compiled_ms']:.3f} ms, plain {r['plain_ms']:.3f} ms, ratio {r['ratio']:.2f}x")

    # 2. the ONNX file on ONNX Runtime's CUDA provider
    with tempfile.TemporaryDirectory() as tmp:
        path = cm.to_onnx(Path(tmp) / "moment.onnx")
        try:
            gpu = mp.OnnxRunner(path, "cuda")
        except ProviderError as exc:
            print(f"ONNX on CUDA: skipped: {exc}")
            results["onnx_cuda"] = f"skipped: {exc}"
        else:
            import onnxruntime as ort

            plain_path = Path(tmp) / "plain.onnx"
            torch.onnx.export(model.cpu(), (torch.randn(8, 784),), str(plain_path), dynamo=True, input_names=["input"],
                              dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
            plain_session = ort.InferenceSession(str(plain_path), providers=["CUDAExecutionProvider"])
            cpu = mp.OnnxRunner(path, "cpu")
            for batch in (1, 256):
                x = np.random.default_rng(batch).standard_normal((batch, 784)).astype(np.float32)
                out, ref = gpu(x), cpu(x)
                errors = {k: relative(out[k], ref[k]) for k in ref}
                ok &= max(errors.values()) < RTOL
                binding = plain_session.io_binding()
                binding.bind_cpu_input("input", x)
                binding.bind_output(plain_session.get_outputs()[0].name, "cuda")
                compiled_ms = median_ms(lambda: gpu(x), lambda: None)
                plain_ms = median_ms(lambda: (plain_session.run_with_iobinding(binding), binding.copy_outputs_to_cpu()),
                                     lambda: None)
                results[f"onnx_cuda_batch{batch}"] = {"max_rel_error_vs_cpu": errors, "compiled_ms": compiled_ms,
                                                      "plain_ms": plain_ms, "ratio": compiled_ms / plain_ms}
                print(f"ONNX CUDA batch {batch}: error vs ONNX CPU {errors}; compiled {compiled_ms:.3f} ms, plain "
                      f"{plain_ms:.3f} ms, ratio {compiled_ms / plain_ms:.2f}x (IO binding, host copies included)")
    # 3. convolutional networks, diag and full
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from oracles import cnn_input, make_cnn, random_posterior

    for name in ("lenet", "resnet"):
        model = make_cnn(name)
        for covariance, predictive in (("diag", "suq"), ("full", "glm")):
            cm = mp.compile(model, random_posterior(model, 1e-4), (cnn_input(name, 2),), covariance=covariance,
                            predictive=predictive)
            r = results[f"torch_{name}_{covariance}_batch256"] = against_cpu(
                cm, on_device(cm.program, device), copy.deepcopy(model).to(device), cnn_input(name, 256, seed=1),
                device, sync, repeats=20)
            ok &= max(r["max_rel_error_vs_cpu"].values()) < RTOL
            print(f"torch {device} {name} {covariance}/{predictive} batch 256: error vs CPU "
                  f"{r['max_rel_error_vs_cpu']}; compiled {r['compiled_ms']:.3f} ms, plain {r['plain_ms']:.3f} ms, "
                  f"ratio {r['ratio']:.2f}x")
    results["ok"] = bool(ok)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print("all comparisons within tolerance" if ok else f"a comparison exceeded the tolerance {RTOL}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
