"""Does a text-to-image teacher at the embedded default's LlamaGen size follow its captions? A sizing study for the
`t2i` family: captioned Fashion-MNIST, the default's LlamaGen tokenizer, a caption-prefix GPT trained as the default's
teacher is, sampled on held-out caption templates.

    python scripts/t2i_teacher.py [DATA] [N_STEPS]   # DATA: a `dvc repro` run's data/ (default: data); N_STEPS: 600
                                                     # writes reports/t2i/teacher_<N_STEPS>.json

Training: every training image of data/prepare gets drawn attributes (dd.captions) rendered into it and one caption
of the train templates; the GPT (the default teacher's width and depth, caption prefix of N_TOKENS MiniLM tokens)
trains for N_STEPS steps with the default teacher's optimiser settings. Evaluation: N_EVAL samples at CFG 2.0 for
captions of the held-out templates (classes and attributes uniform), then the class accuracy of the pipeline's
feature classifier on `captions.canonical` images and each attribute's measured accuracy (chance 10 % / 50 %); the
same for unguided sampling and for the rendered test images themselves (the measurements' ceiling).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dd import bench, captions, data, io, llamagen, metrics, teachers, train  # noqa: E402

N_TOKENS, BATCH, N_EVAL, SEED = 24, 128, 500, 0
OUT = Path(__file__).resolve().parents[1] / "reports" / "t2i"
CKPT = Path(__file__).resolve().parents[1] / "data" / "t2i_study"  # resumable training state (not in git)


def main(root: Path, n_steps: int) -> None:
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    meta = io.read_json(root / "prepare" / "meta.json")
    train_x, train_y, _ = data.load_split("train", root / "prepare")
    test_x, test_y, _ = data.load_split("test", root / "prepare")
    tables = {s: captions.caption_table(meta["classes"], s) for s in ("train", "heldout")}
    attrs, ids = captions.assign(train_y, tables["train"], g)
    tok = teachers.load_model(root / "train_tokenizer" / "llamagen", "tokenizer", llamagen.VQModel)
    tokens = teachers.LlamaGen.encode(tok, captions.render(train_x, attrs))
    feats = {s: captions.encode([r["text"] for r in t], N_TOKENS) for s, t in tables.items()}

    gpt = llamagen.GPT(vocab_size=tok.config["codebook_size"], dim=192, n_layer=4, n_head=4,
                       grid_size=meta["image_size"] // tok.downsample_factor, token_dropout_p=0.0,
                       resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.1,
                       caption_dim=captions.ENCODER_DIM, cls_token_num=N_TOKENS)
    gpt.cls_embedding.set_captions(*feats["train"])
    cfg = train.FitConfig(n_steps=n_steps, batch_size=BATCH, lr=0.003, weight_decay=0.05, warmup_steps=50,
                          seed=SEED, precision="auto")
    fit = train.fit(gpt, teachers.LlamaGen.teacher_loss_fn(tok), {"tokens": tokens, "labels": ids}, cfg,
                    ckpt_path=CKPT / f"train_state_{n_steps}.pt", desc="t2i teacher")

    net, _, _ = metrics.load_feature_space(root / "features")
    held = tables["heldout"]
    gpt.eval().cls_embedding.set_captions(*feats["heldout"])
    want_y = torch.arange(N_EVAL) % len(meta["classes"])
    want_a, eval_ids = captions.assign(want_y, held, torch.Generator().manual_seed(SEED + 1))
    rows = {}
    for name, scale in (("cfg 2.0", 2.0), ("no cfg", 1.0)):
        out = torch.cat([gpt.generate(eval_ids[i:i + 250], scale, generator=torch.Generator().manual_seed(SEED + i))
                         for i in range(0, N_EVAL, 250)])
        images = teachers.LlamaGen.decode(tok, out)
        rows[name] = {"class_acc": metrics.class_accuracy(net, captions.canonical(images), want_y),
                      **captions.attribute_accuracy(images, want_a)}
    ref_a, _ = captions.assign(test_y[:N_EVAL], held, torch.Generator().manual_seed(SEED + 2))
    rendered = captions.render(test_x[:N_EVAL], ref_a)
    rows["rendered test images"] = {"class_acc": metrics.class_accuracy(net, captions.canonical(rendered),
                                                                        test_y[:N_EVAL]),
                                    **captions.attribute_accuracy(rendered, ref_a)}
    result = {"device": bench.device_name("cpu"), "precision": train.resolve_precision("auto", "cpu"),
              "train_seconds": fit["seconds"], "n_steps": n_steps,
              "batch_size": BATCH, "caption_tokens": N_TOKENS, "final_loss": fit["history"][-1]["loss"],
              "n_eval": N_EVAL, "rows": rows}
    io.write_json(OUT / f"teacher_{n_steps}.json", result)
    print(result)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("data"), int(sys.argv[2]) if len(sys.argv) > 2 else 600)
