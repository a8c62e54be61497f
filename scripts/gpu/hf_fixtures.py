#!/usr/bin/env python3
"""transformers' outputs for the reference fixtures on one device, for scripts/gpu-check.

For each fixture directory and dtype: load the model with AutoModelForCausalLM (eager attention,
f32 matmuls without TF32), greedy-generate 20 tokens from the fixture's prompt ids with EOS
ignored, and write one JSON line with the logits of the last prompt position (`first_logits`)
and the tokens (`greedy_ids`). The first line describes the versions and the device. Lines are
flushed one by one, so what was done survives if the caller stops this process at its time limit.

FP8 fixtures: transformers' FineGrainedFP8 path rejects weights with partial 128-blocks (see
worker/tests/fixtures/README.md), so, as generate.py does, the weights are dequantized with
DeepSeek's block rule into a temporary f32 copy (without the MTP layers) that transformers loads.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
import traceback

GREEDY_TOKENS = 20
FP8_BLOCK = 128


def emit(out, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def dequantized_copy(fixture: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path:
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((fixture / "config.json").read_text())
    layers = config["num_hidden_layers"]
    tensors: dict = {}
    for shard in sorted(fixture.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    plain: dict = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
            continue  # the MTP layer transformers does not have
        if tensor.dtype == torch.float8_e4m3fn:
            scale_inv = tensors[name + "_scale_inv"]
            scale = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
            tensor = tensor.to(torch.float32) * scale[: tensor.shape[0], : tensor.shape[1]]
        plain[name] = tensor.to(torch.float32).contiguous()
    out = scratch / fixture.name
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", required=True, help="comma-separated fixture directories")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="f32")
    parser.add_argument("--out", required=True, help="JSON lines are appended here")
    args = parser.parse_args()

    out = open(args.out, "a", encoding="utf-8")
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = torch.device(args.device)
    info = {
        "kind": "versions",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": args.device,
        "import_seconds": time.perf_counter() - started,
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    emit(out, info)

    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as scratch:
        for fixture in [pathlib.Path(p) for p in args.fixtures.split(",") if p]:
            reference = json.loads((fixture / "reference.json").read_text())
            prompt = reference["prompt_ids"]
            config = json.loads((fixture / "config.json").read_text())
            model_dir = fixture
            note = ""
            for name in args.dtypes.split(","):
                record = {"kind": "fixture", "fixture": fixture.name, "dtype": name, "device": args.device}
                t0 = time.perf_counter()
                try:
                    if "quantization_config" in config and model_dir == fixture:
                        model_dir = dequantized_copy(fixture, pathlib.Path(scratch))
                        note = "FP8 weights dequantized with DeepSeek's 128x128 block rule into an f32 copy (transformers' FP8 path rejects partial blocks)"
                    model = AutoModelForCausalLM.from_pretrained(
                        model_dir, dtype=dtypes[name], attn_implementation="eager"
                    ).to(device).eval()
                    ids = torch.tensor([prompt], device=device)
                    with torch.no_grad():
                        generated = model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            max_new_tokens=GREEDY_TOKENS,
                            do_sample=False,
                            eos_token_id=None,
                            pad_token_id=1,
                            output_logits=True,
                            return_dict_in_generate=True,
                        )
                    record["greedy_ids"] = generated.sequences[0, len(prompt) :].tolist()
                    record["first_logits"] = generated.logits[0][0].float().cpu().tolist()
                    if note:
                        record["note"] = note
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                except Exception as err:  # noqa: BLE001 - recorded, the next fixture still runs
                    record["error"] = f"{type(err).__name__}: {err}"
                    record["traceback"] = traceback.format_exc()[-2000:]
                record["seconds"] = time.perf_counter() - t0
                emit(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
