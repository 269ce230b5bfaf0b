"""A `seq2seq` task beside a classification head on one encoder-decoder backbone (T5 and BART),
end to end with the real CLI: it trains and evaluates with generation metrics, holds the backbone
once (the language-model head tied to the shared embeddings), exports both tasks, and the exports
give the multitask model's outputs (`AutoModelForSeq2SeqLM.generate`; `pipeline` for the
classifier). `predict` writes the generated texts."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_tiny_encoder_decoder, run_cli, write_decoder_tasks
from tests.runs import weights

RUN = "s2s"


@pytest.fixture(scope="module", params=["t5", "bart"])
def trained(request, tmp_path_factory):
    model = make_tiny_encoder_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    tasks = write_decoder_tasks(tmp_path_factory.mktemp("s2s-tasks"), generation_type="seq2seq")
    out = tmp_path_factory.mktemp("s2s")
    values = {"model_name": model, "model_init": "scratch", "tasks_file": tasks, "tasks": "rewrite,color",
              "output_dir": out, "run_name": RUN, "num_train_epochs": 12, "train_batch_size": 8, "eval_batch_size": 8,
              "learning_rate": 3e-3, "max_seq_length": 32, "max_new_tokens": 8, "seed": 4}
    done = run_cli("train", *[f"--{k}={v}" for k, v in values.items()], env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return model, tasks, out / RUN


def prompts(tasks) -> list[str]:
    path = json.loads(tasks.read_text())["tasks"][0]["files"]["validation"]
    return [json.loads(line)["text"] for line in open(path)][:6]


def test_seq2seq_beside_a_classifier_on_an_encoder_decoder_learns(trained):
    _, _, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval"]["eval_color_accuracy"] > 0.9
    rewrite = metrics["chance"]["rewrite"]["exact_match"]
    assert rewrite["learned"], rewrite
    assert "eval_rewrite_perplexity" in metrics["eval"]


def test_the_backbone_is_stored_once_and_the_exports_give_the_multitask_outputs(trained):
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from trainer.modeling import MultitaskModel

    _, tasks, run_dir = trained
    saved = weights(run_dir)
    assert not [k for k in saved if k.startswith("heads.") and ("shared" in k or "lm_head" in k or ".encoder." in k)]
    model = MultitaskModel.from_checkpoint(run_dir / "final").eval()
    head = model.heads["rewrite"]
    assert head.get_output_embeddings().weight is model.encoder.get_input_embeddings().weight
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final" / "export" / "rewrite")
    standalone = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "final" / "export" / "rewrite").eval()
    batch = tokenizer(prompts(tasks), padding=True, return_tensors="pt")
    ours = head.generate(**batch, max_new_tokens=8, do_sample=False)
    theirs = standalone.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)
    classifier = AutoModelForSequenceClassification.from_pretrained(run_dir / "final" / "export" / "color").eval()
    with torch.no_grad():
        assert torch.allclose(model(task="color", **batch).logits, classifier(**batch).logits, atol=1e-5)
    labels = [r["label"] for r in pipeline("text-classification", model=str(run_dir / "final" / "export" / "color"))(
        prompts(tasks), batch_size=3)]
    assert labels == [classifier.config.id2label[i] for i in classifier(**batch).logits.argmax(-1).tolist()]


def test_predict_writes_the_generated_texts(trained, tmp_path):
    from transformers import AutoTokenizer

    from trainer.modeling import MultitaskModel

    _, tasks, run_dir = trained
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts(tasks)))
    done = run_cli("predict", "--task=rewrite", f"--input={inputs}", f"--output_dir={run_dir.parent}", f"--run_name={RUN}",
                   "--max_new_tokens=8")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "in.rewrite.predictions.jsonl").read_text().splitlines()]
    model = MultitaskModel.from_checkpoint(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    batch = tokenizer(prompts(tasks), padding=True, return_tensors="pt")
    out = model.heads["rewrite"].generate(**batch, max_new_tokens=8, do_sample=False)
    assert rows == [{"text": t} for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
