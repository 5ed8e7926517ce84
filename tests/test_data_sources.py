"""The one reader (`open_rows`) over every source: Parquet (verl and raw forms), chat-message
SFT rows, Hugging Face datasets on disk, TFDS from a local data_dir; errors name the file, the
row and the field. The files are written here with pyarrow / datasets / tfds themselves."""

import json
import os
import re
import subprocess
import sys

import pytest

from opera_jax.data.jsonl import write_jsonl
from opera_jax.data.packing import TokenizeSFT
from opera_jax.data.pipeline import TokenizePrompt
from opera_jax.data.schema import PROMPT_FIELDS, SFT_FIELDS, BadRowError
from opera_jax.data.sources import open_rows
from opera_jax.tokenizer import encode_prompt, load_tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def verl_row(i: int, ability: str = "math", **extra) -> dict:
    """One row of the published verl RL schema."""
    return {"data_source": "toy/gsm", "ability": ability,
            "prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"What is {i} + {i}?"}],
            "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
            "extra_info": {"index": i, "split": "train"}, **extra}


def write_parquet(path, rows) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def test_verl_parquet_maps_onto_prompt_rows(tmp_path):
    path = write_parquet(tmp_path / "rl.parquet", [verl_row(1), verl_row(2, "writing")])
    rows = open_rows(path, required=PROMPT_FIELDS)
    assert len(rows) == 2
    first = rows[0]
    assert (first["prompt"], first["system"], first["reference"], first["task_type"]) == (
        "What is 1 + 1?", "Be brief.", "2", "math")
    assert first["id"] == "1" and first["data_source"] == "toy/gsm"
    assert first["extra_info"] == {"index": 1, "split": "train"}
    assert first["_source"] == f"{path} row 1"
    assert rows[1]["task_type"] == "writing" and rows[1]["reference"] == "4"
    # reward_model.task_type wins over ability; numbers become strings
    path = write_parquet(tmp_path / "typed.parquet", [
        {**verl_row(3, "code"), "reward_model": {"ground_truth": "6", "task_type": "math"}}])
    assert open_rows(path, required=PROMPT_FIELDS)[0]["task_type"] == "math"


def test_verl_prompt_goes_through_the_chat_template_with_its_system_message(tmp_path):
    path = write_parquet(tmp_path / "rl.parquet", [verl_row(5)])
    tok = load_tokenizer(None)
    out = TokenizePrompt(tok, max_prompt_len=256)(open_rows(path, required=PROMPT_FIELDS)[0])
    want = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 5 + 5?"}],
        tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert tok.decode(out["prompt_ids"].tolist()) == want
    assert want.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 5")
    assert tok.decode(out["reference_ids"].tolist()) == "10"
    assert out["task_type"] == "math"


@pytest.mark.parametrize("row, message", [
    ({**verl_row(1), "reward_model": {"style": "rule"}},
     "row 2: field 'reward_model.ground_truth' is missing"),
    (verl_row(1, "code"), "row 2: field 'ability' is 'code'; valid: writing, math"),
    ({**verl_row(1), "prompt": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]},
     "row 2: field 'prompt[1].role' is 'assistant'"),
    ({**verl_row(1), "prompt": [{"role": "system", "content": "only a system message"}]},
     "row 2: field 'prompt' has no user message"),
])
def test_verl_errors_name_file_row_and_field(tmp_path, row, message):
    path = write_parquet(tmp_path / "bad.parquet", [verl_row(0), row])
    with pytest.raises(BadRowError, match=re.escape(f"{path} {message}")):
        open_rows(path, required=PROMPT_FIELDS)
    assert len(open_rows(path, required=PROMPT_FIELDS, on_bad_row="skip")) == 1


def test_raw_prompt_output_ability_parquet(tmp_path):
    path = write_parquet(tmp_path / "raw.parquet", [
        {"prompt": "Tell a story.", "output": "Once upon a time.", "ability": "writing"},
        {"prompt": "2 + 2?", "output": "4", "ability": "math"}])
    rows = open_rows(path, required=PROMPT_FIELDS)
    assert [(r["prompt"], r["reference"], r["task_type"]) for r in rows] == [
        ("Tell a story.", "Once upon a time.", "writing"), ("2 + 2?", "4", "math")]
    with pytest.raises(BadRowError, match=f"{path} row 1: missing field 'thinking'"):
        open_rows(path, required=SFT_FIELDS)  # an answer without a think block is no SFT row


def sft_chat_row(i: int) -> dict:
    return {"id": str(i), "messages": [
        {"role": "user", "content": f"Describe lamp {i}."},
        {"role": "assistant", "content": f"<think>\nIt is red.\n\nWait, blue.\n</think>\n\nBlue {i}."}]}


def test_sft_reads_chat_messages_as_prompt_thinking_output(tmp_path):
    jsonl = write_jsonl(tmp_path / "chat.jsonl", [sft_chat_row(1), sft_chat_row(2)])
    parquet = write_parquet(tmp_path / "chat.parquet", [sft_chat_row(3)])
    rows = open_rows(f"{jsonl},{parquet}", required=SFT_FIELDS)
    assert [(r["prompt"], r["thinking"], r["output"]) for r in rows] == [
        (f"Describe lamp {i}.", "It is red.\n\nWait, blue.", f"Blue {i}.") for i in (1, 2, 3)]
    assert [r["_source"] for r in rows] == [f"{jsonl}:1", f"{jsonl}:2", f"{parquet} row 1"]
    # the same tokens as the plain row: the chat template around the user turn, then the
    # trained response format
    tok = load_tokenizer(None)
    sft = TokenizeSFT(tok, eos_id=1021, seq_len=512)
    plain = {"prompt": "Describe lamp 1.", "thinking": "It is red.\n\nWait, blue.",
             "output": "Blue 1."}
    a, b = sft(rows[0]), sft(plain)
    assert a["tokens"].tolist() == b["tokens"].tolist()
    assert tok.decode(a["tokens"][a["loss_mask"] == 1].tolist()) == (
        "<think>\nIt is red.\n\nWait, blue.\n</think>\n\nBlue 1.<|im_end|>")
    # the think block inside a raw output works the same way
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "Describe lamp 1.",
                                                "output": rows[0]["messages"][1]["content"]}])
    assert sft(open_rows(raw, required=SFT_FIELDS)[0])["tokens"].tolist() == a["tokens"].tolist()


def test_sft_chat_errors_name_the_field(tmp_path):
    bad = sft_chat_row(2)
    bad["messages"][1]["content"] = "Blue, no thinking."
    path = write_jsonl(tmp_path / "bad.jsonl", [sft_chat_row(1), bad])
    with pytest.raises(BadRowError, match=rf"^{path}:2: field 'messages\[1\].content' has no "
                                          "<think>…</think> block"):
        open_rows(path, required=SFT_FIELDS)
    bad["messages"] = bad["messages"][:1]
    write_jsonl(path, [bad])
    with pytest.raises(BadRowError, match=rf"{path}:1: field 'messages\[0\]' must be the "
                                          "assistant's answer"):
        open_rows(path, required=SFT_FIELDS)


def test_hugging_face_datasets_on_disk_and_local_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = [verl_row(i) for i in range(3)]
    test = [{"prompt": "Tell a story.", "reference": "Once.", "task_type": "writing"}]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(saved))
    rows = open_rows(f"hf:{saved}", required=PROMPT_FIELDS)  # default split: train
    assert [r["reference"] for r in rows] == ["0", "2", "4"]
    assert rows[1]["system"] == "Be brief." and rows[1]["_source"] == f"hf:{saved}:train row 2"
    rows = open_rows(f"hf:{saved}:test", required=PROMPT_FIELDS)
    assert [(r["prompt"], r["reference"]) for r in rows] == [("Tell a story.", "Once.")]
    with pytest.raises(KeyError, match="no split 'validation'; splits: test, train"):
        open_rows(f"hf:{saved}:validation")
    one = tmp_path / "one"
    datasets.Dataset.from_list(test).save_to_disk(str(one))
    assert open_rows(f"hf:{one}", required=PROMPT_FIELDS)[0]["reference"] == "Once."
    # local data files through the packaged builder of their suffix
    write_jsonl(tmp_path / "files" / "a.jsonl", train[:2])
    write_jsonl(tmp_path / "files" / "b.jsonl", train[2:])
    rows = open_rows(f"hf:{tmp_path}/files/*.jsonl", required=PROMPT_FIELDS)
    assert [r["reference"] for r in rows] == ["0", "2", "4"]
    with pytest.raises(FileNotFoundError, match="not a dataset written by save_to_disk"):
        open_rows(f"hf:{tmp_path}/files")
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([train[0], {**train[1], "ability": "chess"}]).save_to_disk(str(bad))
    with pytest.raises(BadRowError, match=f"hf:{bad}:train row 2: field 'ability' is 'chess'"):
        open_rows(f"hf:{bad}", required=PROMPT_FIELDS)


def test_tfds_from_a_local_data_dir(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    class OperaTinyPrompts(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"prompt": text, "reference": text, "ability": text}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4), "test": self._generate_examples(1)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"prompt": f"Story {i}?", "reference": f"Once {i}.",
                          "ability": "writing" if i < 3 else "poetry"}

    data_dir = str(tmp_path / "tfds")
    OperaTinyPrompts(data_dir=data_dir, file_format="array_record").download_and_prepare()
    rows = open_rows("tfds:opera_tiny_prompts:test", tfds_data_dir=data_dir,
                     required=PROMPT_FIELDS)
    assert [(r["prompt"], r["reference"], r["task_type"]) for r in rows] == [
        ("Story 0?", "Once 0.", "writing")]
    with pytest.raises(BadRowError, match=r"tfds:opera_tiny_prompts \(.*\) row \d: field "
                                          "'ability' is 'poetry'"):
        open_rows("tfds:opera_tiny_prompts", tfds_data_dir=data_dir, required=PROMPT_FIELDS)
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)  # the environment names the data_dir
    rows = open_rows("tfds:opera_tiny_prompts:train", required=PROMPT_FIELDS, on_bad_row="skip")
    assert sorted(r["reference"] for r in rows) == ["Once 0.", "Once 1.", "Once 2."]
    monkeypatch.delenv("TFDS_DATA_DIR")
    with pytest.raises(ValueError, match="set data.tfds_data_dir or \\$TFDS_DATA_DIR"):
        open_rows("tfds:opera_tiny_prompts")
    with pytest.raises(ValueError, match="cannot open 'no_such_set'"):
        open_rows("tfds:no_such_set", tfds_data_dir=data_dir)


@pytest.mark.slow
def test_grpo_command_on_a_verl_parquet_file(tmp_path):
    """The command of the README, on a parquet file in the published verl schema (~2 min)."""
    rows = [{"data_source": "toy", "ability": "writing",
             "prompt": [{"role": "user", "content": f"Tale {i}."}],
             "reward_model": {"style": "model", "ground_truth": f"Once, {i}."},
             "extra_info": {"index": i}} for i in range(16)]
    path = write_parquet(tmp_path / "rl.parquet", rows)
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "opera_jax.train", "--config=configs/grpo_tiny.py",
           f"--config.data.path={path}", "--config.grpo.steps=2", f"--config.workdir={workdir}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert os.listdir(workdir / "checkpoints") == ["2"]
