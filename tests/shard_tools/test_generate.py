"""shard_tools/generate.py: prompts -> images (a tiny random-weight diffusers pipeline) -> shards -> streamed, resume,
and ingestion of images generated elsewhere. Plumbing only: the images are noise from random weights."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image

from shard_tools.generate import (
    GenerateError,
    generate,
    image_seed,
    ingest,
    load_pipeline,
    main,
    prompts_from_classes,
    read_prompts,
)
from shard_tools.shardset import load_shard_set
from shard_tools.synth import render
from shard_tools.verify import verify
from stream_ssl.data.plan import Slice
from stream_ssl.data.reader import ShardReader
from tests.helpers.crawl_server import NAMES
from tests.helpers.packing import read_csv, run_tool, write_csv

CLASSES = ["dog", "cat"]
TEMPLATES = ["a photo of a {name}", "a drawing of a {name}"]
SETTINGS = dict(per_prompt=2, label_names=CLASSES, steps=2, guidance=2.0, width=16, height=16, batch_size=3,
                shard_size=3, image_format="png", device="cpu")


def build_tiny_pipeline(folder):
    """A Stable Diffusion pipeline with random weights, a few thousand parameters per part, saved to `folder`."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture(scope="module")
def generated(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "generated"
    result = generate(out, prompts_from_classes(CLASSES, TEMPLATES), model, **SETTINGS)
    return out, result


def _samples(out) -> list[dict]:
    shard_set = load_shard_set(str(out))
    reader = ShardReader((shard_set,))
    return [s for i, sh in enumerate(shard_set.shards) for s in reader.read(Slice(0, i, 0, sh.samples))]


def _tars(out) -> dict[str, str]:
    index = json.loads((out / "index.json").read_text())
    return {s["path"]: hashlib.sha256((out / s["path"]).read_bytes()).hexdigest() for s in index["shards"]}


def test_prompts_become_images_in_shards_that_stream(generated):
    out, result = generated
    assert (result.jobs, result.written, result.made, result.shards) == (8, 8, 8, 3)
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "generated" and index["labels"]["names"] == CLASSES
    assert index["fields"] == ["image", "json", "cls"] and index["generation"]["steps"] == 2
    assert verify(str(out), decode=True, out=io.StringIO())

    samples = _samples(out)
    assert len(samples) == 8
    seen = {}
    for s in samples:
        meta = json.loads(s["json"])
        p, k = meta["prompt_index"], meta["image_index"]
        label, template = divmod(p, len(TEMPLATES))
        assert meta["source"] == "generated" and meta["model"] == "tiny-sd"
        assert meta["prompt"] == TEMPLATES[template].format(name=CLASSES[label])
        assert meta["class"] == meta["label_name"] == CLASSES[label] and meta["label"] == label == int(s["cls"])
        assert meta["seed"] == image_seed(0, p, k) and meta["template"] == TEMPLATES[template]
        assert (meta["width"], meta["height"], meta["steps"], meta["guidance"]) == (16, 16, 2, 2.0)
        with Image.open(io.BytesIO(s["png"])) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
        seen[(p, k)] = meta["seed"]
    assert sorted(seen) == [(p, k) for p in range(4) for k in range(2)]
    assert len(set(seen.values())) == 8
    order = [json.loads(s["json"])["prompt_index"] for s in samples]
    assert order != sorted(order)  # the work was shuffled: shards are not prompt by prompt


class _Interrupted:
    """A pipeline that stops (like Ctrl-C) on its call number `calls` + 1."""

    def __init__(self, pipe, calls: int):
        self.pipe, self.calls = pipe, calls

    def __call__(self, prompt, num_inference_steps, guidance_scale, height, width, generator, output_type="pil"):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return self.pipe(prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         height=height, width=width, generator=generator, output_type=output_type)


def test_an_interrupted_run_resumes_after_its_complete_shards(model, generated, tmp_path):
    reference, _ = generated
    out = tmp_path / "generated"
    prompts = prompts_from_classes(CLASSES, TEMPLATES)
    with pytest.raises(KeyboardInterrupt):
        generate(out, prompts, model, pipeline=_Interrupted(load_pipeline(model, "cpu"), calls=2), **SETTINGS)
    assert not (out / "index.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["generated-000000.tar", "generated-000001.tar"]

    resumed = generate(out, prompts, model, **SETTINGS)
    assert (resumed.resumed_shards, resumed.made, resumed.written) == (2, 2, 8)
    assert _tars(out) == _tars(reference)  # byte for byte what the uninterrupted run wrote
    assert not (out / ".generated-gen").exists()

    again = generate(out, prompts, model, **SETTINGS)
    assert again.already_complete and again.made == 0
    with pytest.raises(GenerateError, match=r"other settings \(changed: steps\)"):
        generate(out, prompts, model, **{**SETTINGS, "steps": 3})


def test_cli_generates_from_class_names(model, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--model", str(model), "--classes", "dog,cat", "--template", "a {name}", "--per-prompt", "2",
                 "--size", "16", "--steps", "2", "--device", "cpu", "--out", str(out), "--shard-size", "3"]) == 0
    assert "wrote 4 of 4 images into 2 shards" in capsys.readouterr().out
    metas = [json.loads(s["json"]) for s in _samples(out)]
    assert sorted((m["prompt"], m["label"]) for m in metas) == [("a cat", 1)] * 2 + [("a dog", 0)] * 2
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in _samples(out))


def test_the_model_must_be_a_local_folder(tmp_path):
    prompts = prompts_from_classes(["dog"])
    with pytest.raises(GenerateError, match="never downloads"):
        generate(tmp_path / "out", prompts, "runwayml/stable-diffusion-v1-5")
    with pytest.raises(GenerateError, match="never downloads"):
        generate(tmp_path / "out", prompts, tmp_path)  # a folder, but not a pipeline
    with pytest.raises(GenerateError, match=r"\{name\}"):
        prompts_from_classes(["dog"], ["a photo of a {class}"])


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red car\n\na blue boat\n")
    prompts, names = read_prompts(tmp_path / "p.txt")
    assert [(p.text, p.label, p.row) for p in prompts] == [("a red car", None, 1), ("a blue boat", None, 3)]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "label": 3, "style": "oil"}\n{"prompt": "y", "label": 1}\n')
    prompts, names = read_prompts(tmp_path / "p.jsonl")
    assert names == [] and [(p.label, p.extra()) for p in prompts] == [(3, {"style": "oil"}), (1, {})]
    write_csv(tmp_path / "p.csv", ["text", "class"], [["a zebra", "zebra"], ["an ant", "ant"]])
    prompts, names = read_prompts(tmp_path / "p.csv")
    assert names == ["ant", "zebra"] and [(p.label, p.name) for p in prompts] == [(1, "zebra"), (0, "ant")]
    write_csv(tmp_path / "bad.csv", ["words"], [["a zebra"]])
    with pytest.raises(GenerateError, match="no prompt column"):
        read_prompts(tmp_path / "bad.csv")


def test_ingest_a_folder_with_its_prompts(tmp_path):
    folder = tmp_path / "made_elsewhere"
    (folder / "sub").mkdir(parents=True)
    rows = []
    for i in range(10):
        name = f"sub/{i}.png" if i % 2 else f"{i}.jpg"
        render(i, i % 4, 16, "b", 2).save(folder / name)
        rows.append([name, f"a photo of a {NAMES[i % 4]}", NAMES[i % 4], 1000 + i, "euler"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [["broken.jpg", "a broken one", NAMES[0], 7, "euler"], ["gone.png", "a lost one", NAMES[1], 8, "euler"]]
    prompts = write_csv(tmp_path / "prompts.csv", ["file", "prompt", "class", "seed", "sampler"], rows)
    out = tmp_path / "ingested"
    proc = run_tool("generate.py", "--from-folder", folder, "--prompts", prompts, "--out", out, "--shard-size", "4",
                    "--max-error-rate", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 10 of 12 images into 3 shards" in proc.stdout and "skipped 2" in proc.stdout
    assert verify(str(out), decode=True, out=io.StringIO())
    errors = {e["file"]: e["reason"] for e in read_csv(out / "ingested-errors.csv")}
    assert errors["gone.png"] == "missing file" and errors["broken.jpg"].startswith("corrupt image")
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "generated" and index["labels"]["names"] == sorted(NAMES)
    by_file = {json.loads(s["json"])["file"]: s for s in _samples(out)}
    assert sorted(by_file) == sorted(r[0] for r in rows[:10])
    for name, prompt, cls, seed, _ in rows[:10]:
        s = by_file[name]
        meta = json.loads(s["json"])
        assert (meta["prompt"], meta["class"], meta["seed"], meta["sampler"]) == (prompt, cls, seed, "euler")
        assert int(s["cls"]) == sorted(NAMES).index(cls) and meta["source"] == "generated"
        assert s["png" if name.endswith(".png") else "jpg"] == (folder / name).read_bytes()

    # The default error rate refuses this folder; --overwrite is needed to replace a set made otherwise.
    with pytest.raises(GenerateError, match="max-error-rate"):
        ingest(folder, prompts, tmp_path / "strict", shard_size=4)
    with pytest.raises(GenerateError, match="other settings"):
        ingest(folder, prompts, out, shard_size=5, max_error_rate=0.2)
    assert ingest(folder, prompts, out, shard_size=5, max_error_rate=0.2, overwrite=True).shards == 2
