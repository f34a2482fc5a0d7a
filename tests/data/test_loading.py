"""Loading documents from local files and folders; the held-out split; packing into blocks."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from workbench.config import DataConfig, ModelConfig
from workbench.data import load_documents, prepare_data, split_documents
from workbench.data.loading import load_rows
from workbench.data.packing import pack_blocks
from workbench.errors import ConfigError
from workbench.models import train_bpe_tokenizer


def _texts(n: int) -> list[str]:
    return [f"Document {i} talks about topic {i % 7} and number {i * 13}." for i in range(n)]


def test_text_folder_is_one_document_per_file(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i, text in enumerate(_texts(5)):
        (folder / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text + "\nsecond line\n")
    (folder / "ignored.md").write_text("not text")
    docs = load_documents(DataConfig(source=str(folder)))
    assert len(docs) == 5
    assert sorted(docs["text"]) == sorted(t + "\nsecond line\n" for t in _texts(5))


def test_jsonl_with_a_named_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(_texts(4))))
    docs = load_documents(DataConfig(source=str(path), text_column="body"))
    assert docs.column_names == ["text"] and docs["text"] == _texts(4)


def test_empty_folder_and_unknown_suffix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no .txt files"):
        load_documents(DataConfig(source=str(tmp_path / "empty")))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match="unknown suffix"):
        load_documents(DataConfig(source=str(tmp_path / "x.xml")))


def test_folder_of_data_files_is_all_their_rows(tmp_path):
    folder = tmp_path / "parts"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(3)))
    (folder / "b" / "c.json").write_text(json.dumps([{"text": t} for t in _texts(5)[3:]]))
    (folder / "README.md").write_text("not data")
    assert load_rows(DataConfig(source=str(folder)))["text"] == _texts(5)
    (folder / "notes.txt").write_text("a document")
    with pytest.raises(ConfigError, match=r"mixes kinds of files \(\.json: 1, \.jsonl: 1, \.txt: 1\)"):
        load_rows(DataConfig(source=str(folder)))


def test_csv_cells_are_text_as_written(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text,answer\nfirst document, 2\nNA,007\n")
    rows = load_rows(DataConfig(source=str(path)))
    assert rows.to_list() == [{"text": "first document", "answer": " 2"}, {"text": "NA", "answer": "007"}]


def test_synthetic_sources_check_their_options():
    assert load_documents(DataConfig(synthetic={"num_entities": 12, "sentences_per_fact": 1}))["text"]
    with pytest.raises(ConfigError, match=r"^field 'data.synthetic.num_entitys': unknown option \(did you"):
        load_documents(DataConfig(synthetic={"num_entitys": 12}))
    with pytest.raises(ConfigError, match=r"^field 'data.synthetic': sentences_per_fact must be >= 1, got 0"):
        load_documents(DataConfig(synthetic={"sentences_per_fact": 0}))
    missing = r"^field 'data.text_column': 'text' is not a column of 'synthetic:arithmetic' \(columns: "
    with pytest.raises(ConfigError, match=missing + r"question, answer, final_answer, num_steps\)$"):
        load_documents(DataConfig(source="synthetic:arithmetic", synthetic={"num_problems": 3}))


def test_validation_never_overlaps_training():
    texts = _texts(40) + _texts(40)[:10]  # ten exact duplicates
    parts = split_documents(Dataset.from_dict({"text": texts}), 0.25, seed=0)
    assert not set(parts["train"]["text"]) & set(parts["validation"]["text"])
    assert len(parts["train"]) + len(parts["validation"]) <= len(texts)


def test_packing_makes_full_blocks_with_eos_between_documents():
    tokenizer = train_bpe_tokenizer(_texts(50), 300)
    batch = {"text": _texts(6)}
    blocks = pack_blocks(batch, tokenizer, block_size=16)["input_ids"]
    stream = [t for d in tokenizer(batch["text"], add_special_tokens=False)["input_ids"] for t in (*d, 0)]
    assert all(len(b) == 16 for b in blocks)
    assert [t for b in blocks for t in b] == stream[: len(blocks) * 16]
    assert tokenizer.eos_token_id == 0


def test_local_folder_trains_end_to_end(tmp_path, tiny):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(_texts(60)):
        (folder / f"{i:03d}.txt").write_text(text * 5)
    from conftest import train_main

    path = tiny(data={"source": str(folder), "synthetic": {}, "block_size": 16}, training={"max_steps": 3})
    assert train_main([str(path)]) == 0
    assert (tmp_path / "runs" / "tiny" / "checkpoint-3" / "model.safetensors").is_file()


def test_prepare_data_is_cached_and_deterministic(tmp_path):
    data = DataConfig(synthetic={"num_entities": 40}, block_size=32, cache_dir=str(tmp_path / "cache"))
    model = ModelConfig(tokenizer_vocab_size=300)
    tok1, blocks1 = prepare_data(data, model)
    tok2, blocks2 = prepare_data(data, model)
    assert blocks1["train"]["input_ids"] == blocks2["train"]["input_ids"]
    assert tok1.get_vocab() == tok2.get_vocab()
    assert len(list((tmp_path / "cache" / "blocks").iterdir())) == 1


def test_racing_builders_of_one_cache_folder_both_succeed(tmp_path):
    """Two processes building the same cache entry (a study's parallel runs): the first rename wins, the
    second discards its copy without error, and no temporary folder is left behind."""
    from workbench.io import publish_folder

    target = tmp_path / "cache" / "entry"

    def write(text):
        return lambda folder: (folder / "data.txt").write_text(text)

    assert publish_folder(target, write("first")) is True
    assert publish_folder(target, write("second")) is False
    assert (target / "data.txt").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["entry"]


@pytest.mark.integration
def test_parallel_runs_share_one_cold_cache(tmp_path):
    """Two processes preparing the same data into an empty cache at once both succeed."""
    import subprocess
    import sys

    code = ("import sys; from workbench.config import DataConfig, ModelConfig; from workbench.data import prepare_data;"
            "tok, b = prepare_data(DataConfig(synthetic={'num_entities': 300}, cache_dir=sys.argv[1], block_size=16),"
            "ModelConfig(preset='pythia-tiny', tokenizer_vocab_size=300)); print(len(b['train']))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[0][0] == outputs[1][0]
    assert not [p for p in (tmp_path / "blocks").iterdir() if p.name.endswith(".tmp")]


def test_question_answer_generators_as_pretraining_text():
    """`synthetic:arithmetic` with `format: text`: each problem and its worked answer as one document, in
    the fine-tuning prompt format, so a base can pretrain on the kind of text its arms fine-tune on."""
    from workbench.data.loading import QA_PROMPT
    from workbench.kinds.finetuning import is_finetuning

    synthetic = {"num_problems": 20, "num_steps": 1, "max_value": 10}
    cfg = DataConfig(source="synthetic:arithmetic", format="text", synthetic=synthetic)
    docs = load_documents(cfg)
    rows = load_rows(cfg)
    assert len(docs) == 20 and not is_finetuning(cfg)
    assert docs[0]["text"] == f"{QA_PROMPT.format(question=rows[0]['question'])} {rows[0]['answer']}"
    assert is_finetuning(DataConfig(source="synthetic:arithmetic", synthetic=synthetic))
    with pytest.raises(ConfigError, match="field 'data.format'.*valid: auto, prompt_completion, text"):
        from workbench.data.finetune import resolve_format

        resolve_format(DataConfig(source="synthetic:arithmetic", format="messages", synthetic=synthetic))
