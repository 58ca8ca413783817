"""Every kind of bad input: a DataError naming file, line and field, or with on_bad_row=skip a counted skip."""

import json
import logging
import time
from pathlib import Path

import pytest

from loraforge.config.data_section import DataConfig
from loraforge.data.build import DataStats, load_rows
from loraforge.errors import DataError
from tests.conftest import UNREACHABLE

GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


def msgs(*pairs, **extra):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs], **extra})


def load(path, fmt="messages", on_bad_row="error", **source):
    config = DataConfig.model_validate(
        {"sources": [{"path": str(path), "format": fmt, **source}], "on_bad_row": on_bad_row}
    )
    stats = DataStats()
    return load_rows(config.sources, None, config.on_bad_row, stats), stats


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CASES = {
    "malformed_json": ([GOOD, '{"messages": [', GOOD], "messages",
                       r":2: not valid JSON: the line ends at column 14 before its JSON does \(Expecting value\): a "
                       r"row cut short"),
    "json_broken_mid_line": ([GOOD, '{"messages": [}, 1]}'], "messages",
                             r":2: not valid JSON \(Expecting value at column 15\); fix or remove the line"),
    "pretty_printed_object": (["{", '  "messages": []', "}"], "messages",
                              r":1: the line holds only '\{': an object written over several lines \(pretty-printed "
                              r"JSON\), and JSON lines holds one object per line; rewrite the file so \(jq -c \. .*d\.jsonl\)"),
    "pretty_printed_array": (["[", GOOD, "]"], "messages",
                             r":1: the line holds only '\[': an array written over several lines .*\(jq -c '\.\[\]' "
                             r".*d\.jsonl, or name the file \.json\)"),
    "not_an_object": ([GOOD, "[1, 2]"], "messages", r":2: expected a JSON object per line, got list"),
    "missing_field": ([GOOD, json.dumps({"prompt": "x"})], "messages", r":2: no 'messages' field \(keys: prompt\)"),
    "wrong_type": ([json.dumps({"messages": {"role": "user"}})], "messages", r":1: field 'messages' is dict, expected list"),
    "empty_assistant": ([GOOD, msgs(("user", "q"), ("assistant", "   "))], "messages", r":2: messages\[1\] is an empty assistant message"),
    "unknown_role": ([msgs(("human", "q"), ("assistant", "a"))], "messages", r":1: messages\[0\]: unknown role 'human'"),
    "ends_on_user": ([GOOD, GOOD, msgs(("user", "q"), ("assistant", "a"), ("user", "and?"))], "messages",
                     r":3: field 'messages' ends on a user turn"),
    "content_not_text": ([json.dumps({"messages": [{"role": "user", "content": 5}]})], "messages",
                         r":1: messages\[0\]: field 'content' is int, expected str"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_names_file_line_and_field(tmp_path, case):
    lines, fmt, expected = CASES[case]
    path = write(tmp_path, lines)
    with pytest.raises(DataError) as info:
        load(path, fmt)
    message = str(info.value)
    assert str(path) in message
    assert pytest.importorskip("re").search(expected, message), message
    assert "data.sources[0]" in message and "on_bad_row=skip" in message


@pytest.mark.parametrize("row, fmt, named", [
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "messages", "alpaca"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "messages", "sharegpt"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "alpaca", "messages"),
    ({"text": "good film", "label": "pos"}, "prompt_completion", "classification"),
])
def test_a_row_of_another_format_names_that_format(tmp_path, row, fmt, named):
    path = write(tmp_path, [json.dumps(row)])
    with pytest.raises(DataError, match=f"these are the fields of format {named}: set data.sources\\[\\].format: {named}"):
        load(path, fmt)


def test_every_bad_row_is_counted_in_one_error_and_the_first_five_listed(tmp_path):
    lines = [GOOD, "{broken", GOOD, *[json.dumps({"prompt": f"x{i}"}) for i in range(6)], GOOD]
    path = write(tmp_path, lines)
    with pytest.raises(DataError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith("7 bad rows, the first 5:\n") and message.endswith("set data.on_bad_row=skip to drop such rows")
    assert [f"{path}:{n}:" in message for n in (2, 4, 5, 6, 7, 8, 9)] == [True] * 5 + [False] * 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_is_skipped_counted_and_listed(tmp_path, case):
    lines, fmt, expected = CASES[case]
    path = write(tmp_path, [GOOD] + lines)
    rows, stats = load(path, fmt, on_bad_row="skip")
    good = sum(1 for line in [GOOD] + lines if line == GOOD)
    assert len(rows["train"]) == good
    assert stats.bad_rows == len(lines) + 1 - good
    assert stats.bad_row_examples and str(path) in stats.bad_row_examples[0]


def test_label_not_in_label_set(tmp_path):
    rows = [json.dumps({"text": "great film", "label": "pos"}), json.dumps({"text": "meh", "label": "neutral"})]
    path = write(tmp_path, rows)
    with pytest.raises(DataError, match=rf"{path}:2: label 'neutral' is not in the label set \['pos', 'neg'\]"):
        load(path, "classification", labels=["pos", "neg"])


def test_blank_lines_are_ignored_silently(tmp_path):
    path = write(tmp_path, ["", GOOD, "   ", "", GOOD, ""])
    rows, stats = load(path)
    assert [r.where for r in rows["train"]] == [f"{path}:2", f"{path}:5"]
    assert stats.bad_rows == 0


def test_utf8_bom_is_named_with_the_fix(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    with pytest.raises(DataError, match=rf"{path}:1: the file starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM"):
        load(path, on_bad_row="skip")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text"):
        load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=rf"{path}: the file is empty"):
        load(path)


def test_only_blank_lines(tmp_path):
    path = write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match=rf"{path}: no rows"):
        load(path)


def test_a_json_list_or_a_parquet_file_without_rows_says_it_has_none(tmp_path):
    """`[]` was said to hold only blank lines, and a parquet file with columns and no rows was 'cannot be read as
    parquet: BatchSize must be greater than 0'."""
    from datasets import Dataset

    listed = tmp_path / "rows.json"
    listed.write_text("[]\n")
    with pytest.raises(DataError, match=rf"{listed}: no rows \(data.sources\[0\]\); the file holds an empty list"):
        load(listed)
    columns = tmp_path / "rows.parquet"
    Dataset.from_dict({"messages": []}).to_parquet(columns)
    with pytest.raises(DataError, match=rf"{columns}: no rows \(its columns are there, its rows are not\)"):
        load(columns)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"{path}: data file not found.*data.sources\[\]\.path"):
        load(path)


def test_all_rows_bad_even_when_skipping(tmp_path):
    path = write(tmp_path, ['{"x": 1}', '{"x": 2}'])
    with pytest.raises(DataError, match="all 2 rows are bad"):
        load(path, on_bad_row="skip")


def test_first_few_bad_rows_are_listed(tmp_path):
    path = write(tmp_path, [GOOD] + ['{"x": 1}'] * 9)
    _, stats = load(path, on_bad_row="skip")
    assert stats.bad_rows == 9 and len(stats.bad_row_examples) == 5
    assert [e.split(": ")[0] for e in stats.bad_row_examples] == [f"{path}:{n}" for n in range(2, 7)]


def test_bad_row_stops_training_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    from loraforge.cli import main

    path = write(tmp_path, [GOOD, '{"messages": [}'])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata:\n  sources: [{{path: {path}}}]\n")
    assert main(["train", str(config), f"output_dir={tmp_path / 'run'}"]) == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run" / "adapter").exists()


def test_an_uncached_hub_dataset_without_a_hub_fails_at_once_in_one_line_and_a_cached_one_goes_to_datasets(
        no_hub, tmp_path, monkeypatch, caplog):
    """As model.name's hub ids: one quick request, where datasets would retry for half a minute."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="huggingface_hub"), pytest.raises(DataError) as error:
        load("someone/chat-data")
    assert str(error.value) == ("someone/chat-data: hub dataset is not in the local hub cache and the hub cannot be "
                                "reached ([Errno 111] Connection refused); point data.sources[].path at a local file, "
                                "or run once online to cache it")
    assert not [r.getMessage() for r in caplog.records if "Retry" in r.getMessage()], "asked the hub once"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"^someone/chat-data: hub dataset is not in the local hub cache and "
                                        r"HF_HUB_OFFLINE is set; point data.sources\[\].path at a local file"):
        load("someone/chat-data")
    commit = "0" * 40
    repo = no_hub / "datasets--someone--chat-data"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "README.md").write_text("# chat data\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(DataError, match=r"^someone/chat-data: cannot load this hub dataset .*offline runs need a local"):
        load("someone/chat-data")


def test_a_hub_dataset_loaded_once_without_a_readme_loads_offline(no_hub, tmp_path, monkeypatch):
    """What loading it once online leaves: in the hub cache a snapshot of its data files and a note that it has no
    README.md, in datasets' cache the rows it prepared, which datasets reads offline. A repo folder that holds no
    snapshot is not cached."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    commit = "0" * 40
    repo = no_hub / "datasets--someone--chat-data"
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "README.md").touch()
    with pytest.raises(DataError, match=r"^someone/chat-data: hub dataset is not in the local hub cache"):
        load("someone/chat-data")

    rows = write(tmp_path, [GOOD, msgs(("user", "q"), ("assistant", "a"))], "train.jsonl")
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    (repo / "snapshots" / commit / "data" / "train.jsonl").write_bytes(rows.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    prepare_as_datasets_does(rows, tmp_path / "datasets-cache" / "someone___chat-data", "chat-data")
    found, _ = load("someone/chat-data")
    assert [r.conversation.messages[-1].content for r in found["train"]] == ["hello", "a"]


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "hub unreachable"])
def test_a_hub_dataset_only_downloaded_into_the_hub_cache_loads_offline(no_hub, tmp_path, monkeypatch, offline):
    """Files fetched with `hf download` or snapshot_download, never loaded by datasets (its cache is empty): offline,
    datasets itself refuses them (OfflineModeIsEnabled); they load as the local folder they are, with the splits
    their names give."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline == "HF_HUB_OFFLINE")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline == "HF_HUB_OFFLINE")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    commit = "0" * 40
    snapshot = no_hub / "datasets--someone--chat-data" / "snapshots" / commit
    (snapshot / "data").mkdir(parents=True)
    write(snapshot / "data", [GOOD, msgs(("user", "q"), ("assistant", "a"))], "train.jsonl")
    write(snapshot / "data", [msgs(("user", "held"), ("assistant", "out"))], "test.jsonl")
    (no_hub / "datasets--someone--chat-data" / "refs").mkdir()
    (no_hub / "datasets--someone--chat-data" / "refs" / "main").write_text(commit)
    found, _ = load("someone/chat-data")
    assert [r.conversation.messages[-1].content for r in found["train"]] == ["hello", "a"]
    held_out, _ = load("someone/chat-data", hub_split="test")
    assert [r.conversation.messages[-1].content for r in held_out["train"]] == ["out"]
    assert huggingface_hub.constants.HF_HUB_OFFLINE == (offline == "HF_HUB_OFFLINE"), "the process's own setting kept"


def prepare_as_datasets_does(rows: Path, folder: Path, name: str) -> None:
    """The rows of `rows` prepared by datasets' own builder as the dataset `name`, kept where datasets keeps a hub
    dataset it loaded once (`folder`/default/0.0.0/hash/; its builder names the config of local files
    default-hash)."""
    from datasets.packaged_modules.json.json import Json

    prepared = Json(cache_dir=str(folder.parent.parent / "building"), dataset_name=name, hash="5e1f0c3a",
                    data_files={"train": str(rows)})
    prepared.download_and_prepare()
    kept = folder / "default" / "0.0.0" / "5e1f0c3a"
    kept.parent.mkdir(parents=True)
    Path(prepared.cache_dir).rename(kept)


def test_a_hub_dataset_only_datasets_prepared_loads_offline_without_the_hub_cache(no_hub, tmp_path, monkeypatch):
    """datasets loads its prepared rows offline and reads no hub cache for them: a hub cache emptied to free disk,
    or a datasets cache copied from another machine, leaves a dataset that loads; one prepared under another name
    does not count."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    rows = write(tmp_path, [GOOD, msgs(("user", "q"), ("assistant", "a"))], "train.jsonl")
    prepare_as_datasets_does(rows, tmp_path / "datasets-cache" / "someone___other_chat", "other_chat")
    with pytest.raises(DataError, match=r"^someone/TinyChat: hub dataset is not in the local hub cache"):
        load("someone/TinyChat")
    prepare_as_datasets_does(rows, tmp_path / "datasets-cache" / "someone___tiny_chat", "tiny_chat")
    found, _ = load("someone/TinyChat")
    assert [r.conversation.messages[-1].content for r in found["train"]] == ["hello", "a"]
    assert not no_hub.exists() or not any(no_hub.iterdir()), "nothing came from the hub cache"


def test_a_cached_hub_dataset_loads_at_once_offline_when_the_hub_cannot_be_reached(no_hub, tmp_path, monkeypatch,
                                                                                    caplog):
    """An offline laptop without HF_HUB_OFFLINE set: asked through datasets, the unreachable hub is retried with
    back-off (1+2+4+8+8 s, about 25 s) before datasets falls back to its cache; one refused probe is enough to load
    it offline, well under 10 s on a slow machine. The process is online again afterwards."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    rows = write(tmp_path, [GOOD, msgs(("user", "q"), ("assistant", "a"))], "train.jsonl")
    prepare_as_datasets_does(rows, tmp_path / "datasets-cache" / "someone___tiny_chat", "tiny_chat")
    start = time.monotonic()
    with caplog.at_level(logging.INFO):
        found, _ = load("someone/TinyChat")
    took = time.monotonic() - start
    assert [r.conversation.messages[-1].content for r in found["train"]] == ["hello", "a"]
    assert took < 10, f"took {took:.1f} s: the hub was asked again"
    assert "someone/TinyChat: the hub cannot be reached; loading it from the local cache" in caplog.messages
    assert not [m for m in caplog.messages if "Retry" in m], "asked the hub once"
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


def test_two_threads_loading_offline_leave_the_process_online(monkeypatch):
    """Two threads each load a cached dataset offline, the second starting while the first is inside: once both are
    done, datasets and huggingface_hub are online again (the second must not restore the offline state it found)."""
    import threading

    import datasets
    import huggingface_hub.constants

    from loraforge.data.sources import _offline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    second_inside, first_done = threading.Event(), threading.Event()

    def second():
        with _offline():
            second_inside.set()
            first_done.wait(timeout=10)

    with _offline():
        other = threading.Thread(target=second)
        other.start()
        second_inside.wait(timeout=0.5)
    first_done.set()
    other.join(timeout=10)
    assert not other.is_alive()
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


def test_a_cached_hub_dataset_with_datasets_offline_is_read_without_asking_the_hub(no_hub, tmp_path, monkeypatch):
    """HF_DATASETS_OFFLINE (datasets' own switch; huggingface_hub's HF_HUB_OFFLINE unset): a dataset datasets
    prepared is read from its cache, and the hub is not asked, as datasets itself would not ask it."""
    import datasets
    import huggingface_hub.constants

    from loraforge.data import sources

    asked = []
    monkeypatch.setattr(sources, "hub_problem", lambda *args, **kwargs: asked.append(args))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    rows = write(tmp_path, [GOOD, msgs(("user", "q"), ("assistant", "a"))], "train.jsonl")
    prepare_as_datasets_does(rows, tmp_path / "datasets-cache" / "someone___tiny_chat", "tiny_chat")
    found, _ = load("someone/TinyChat")
    assert [r.conversation.messages[-1].content for r in found["train"]] == ["hello", "a"]
    assert asked == []


def test_unknown_file_type(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"d.txt: not a .jsonl, .json, .csv or .parquet file"):
        load(path)


def csv_file(tmp_path, rows):
    path = tmp_path / "qa.csv"
    path.write_text("\n".join(["instruction,output", *rows]) + "\n", encoding="utf-8")
    return path


def test_csv_rows_that_do_not_parse_name_their_line(tmp_path):
    good = [f"What is {i}?,{i}" for i in range(20)]
    middle = csv_file(tmp_path, good[:11] + ["What is 2+2?,4, I think"] + good[11:])
    with pytest.raises(DataError, match=rf"{middle}:13: 3 fields where the header names 2 \(instruction, output\); a "
                                        r"field that holds a comma must be quoted"):
        load(middle, "alpaca")
    first = csv_file(tmp_path, ["What is 2+2?,4, I think", *good])
    with pytest.raises(DataError, match=rf"{first}:2: 3 fields where the header names 2"):
        load(first, "alpaca")
    rows, stats = load(first, "alpaca", on_bad_row="skip")
    assert len(rows["train"]) == 20 and stats.bad_rows == 1
    header_only = csv_file(tmp_path, [])
    with pytest.raises(DataError, match=rf"{header_only}: no rows under its header"):
        load(header_only, "alpaca")
    rows, _ = load(csv_file(tmp_path, ['"What is 2+2?","4, I think"', *good]), "alpaca")
    assert rows["train"][0].conversation.messages[-1].content == "4, I think", "a quoted comma stays in its field"
    multi_line = csv_file(tmp_path, ['"Say\ntwo lines",ok', "What is 2+2?,4, I think"])
    with pytest.raises(DataError, match=rf"{multi_line}:4: 3 fields"):
        load(multi_line, "alpaca")


def test_csv_cells_are_the_text_the_file_holds(tmp_path):
    numbers = csv_file(tmp_path, [f"What is {i} plus {i}?,{2 * i}" for i in range(3)])
    rows, _ = load(numbers, "alpaca")
    assert [r.conversation.messages[-1].content for r in rows["train"]] == ["0", "2", "4"]
    extraction = csv_file(tmp_path, ['Who is it?,"{""name"": ""Bob"", ""age"": 3}"', 'Primes?,"[2, 3, 5]"', "Missing?,NA"])
    rows, _ = load(extraction, "alpaca")
    assert [r.conversation.messages[-1].content for r in rows["train"]] == ['{"name": "Bob", "age": 3}', "[2, 3, 5]", "NA"]
    codes = tmp_path / "codes.csv"
    codes.write_text("text,label\nfine,01\nbroken,02\n", encoding="utf-8")
    rows, _ = load(codes, "classification", labels=["01", "02"])
    assert [r.conversation.label for r in rows["train"]] == ["01", "02"]
    chats = tmp_path / "chats.csv"
    chats.write_text('messages\n"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": '
                     '""[1, 2]""}]"\n', encoding="utf-8")
    rows, _ = load(chats, "messages")
    assert [m.content for m in rows["train"][0].conversation.messages] == ["Hi", "[1, 2]"]


def test_csv_quote_never_closed_names_the_line_it_opened_on(tmp_path):
    rows = [f"What is {i}?,,{i}" for i in range(200)]
    rows[4] = 'He said "hi" to me,,"ok'
    path = csv_file(tmp_path, rows)
    path.write_text(path.read_text().replace("instruction,output", "instruction,input,output"))
    for on_bad_row in ("error", "skip"):
        with pytest.raises(DataError, match=rf"{path}:6: a quote opened in the row on this line is never closed"):
            load(path, "alpaca", on_bad_row=on_bad_row)


def test_alpaca_input_under_another_name_is_not_dropped_silently(tmp_path, caplog):
    dolly = [{"instruction": "Summarize", "context": f"Text {i}", "output": f"Sum {i}"} for i in range(3)]
    path = write(tmp_path, [json.dumps(row) for row in dolly])
    rows, _ = load(path, "alpaca")
    assert [m.content for m in rows["train"][0].conversation.messages] == ["Summarize", "Sum 0"]
    assert (f"{path} (data.sources[0]): no row has an 'input' column, so format alpaca reads none, and no field reads "
            "the column 'context'; if that is the input, map it: data.sources[].fields: {input: context}") in caplog.text
    with pytest.raises(DataError, match=rf"{path} \(data.sources\[0\]\): no row has the column 'contxt' that "
                                        r"data.sources\[\].fields maps to input \(columns: context, instruction, "
                                        r"output\); fix fields.input"):
        load(path, "alpaca", fields={"input": "contxt"})
    rows, _ = load(path, "alpaca", fields={"input": "context"})
    assert rows["train"][0].conversation.messages[0].content == "Summarize\n\nText 0"
    caplog.clear()
    plain = write(tmp_path, [json.dumps({"instruction": "Say hi", "output": "hi"})], name="plain.jsonl")
    load(plain, "alpaca")
    assert "no row has" not in caplog.text, "rows of instruction and output alone need no input"


def test_a_mistyped_local_path_is_a_missing_file_at_validate_time_not_a_hub_dataset(tmp_path, capsys, monkeypatch):
    import datasets

    from loraforge.cli import main

    def no_hub(*args, **kwargs):
        raise AssertionError(f"asked the hub for {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: smollm2-135m-instruct}\ndata: {sources: [{path: owner/hub-set}]}\n")
    assert main(["config", "validate", str(config)]) == 0, "a hub dataset name is not checked"
    for name in ("my-org/chat.v2", "someone/wiki.en", "someone/wiki.sv", "someone/wiki.cs", "teknium/OpenHermes-2.5"):
        assert main(["config", "validate", str(config), f"data.sources.0.path={name}"]) == 0, name
    cases = {"data/chat.jsnol": ", and .jsnol is not a type loraforge reads (.jsonl, .json, .csv or .parquet)",
             "data/train.txt": ", and .txt is not a type loraforge reads",
             "data/chat": ", and a name without an extension is not a type loraforge reads",
             "./chat": ", and a name without an extension", "sub/dir/chat.jsonl": ""}
    for path, why in cases.items():
        assert main(["config", "validate", str(config), f"data.sources.0.path={path}"]) == 2, path
        assert f"data.sources[0].path: {path}: data file not found (cwd is {tmp_path}){why}" in capsys.readouterr().err
        with pytest.raises(DataError, match=rf"{path}: data file not found"):
            load(path)


def test_data_paths_start_from_the_home_folder_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, [GOOD])
    rows, _ = load("~/d.jsonl")
    assert [r.where for r in rows["train"]] == [f"{tmp_path}/d.jsonl:1"]


def test_a_csv_cell_over_128_kib_is_read(tmp_path):
    long = "word " * 40000
    path = tmp_path / "big.csv"
    path.write_text(f'text\n"{long}"\nshort\n', encoding="utf-8")
    rows, _ = load(path, "text")
    assert [r.conversation.text for r in rows["train"]] == [long, "short"]


def test_lines_that_are_not_utf8_are_bad_rows_named_by_line(tmp_path):
    latin = json.dumps({"messages": [{"role": "user", "content": "café"}, {"role": "assistant", "content": "oui"}]},
                       ensure_ascii=False).encode("latin-1")
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b"\n".join([GOOD.encode(), latin, GOOD.encode(), latin, GOOD.encode()]) + b"\n")
    rows, stats = load(jsonl, on_bad_row="skip")
    assert len(rows["train"]) == 3 and stats.bad_rows == 2
    assert [e.split(": not UTF-8 text")[0] for e in stats.bad_row_examples] == [f"{jsonl}:2", f"{jsonl}:4"]
    with pytest.raises(DataError, match=rf"^2 bad rows, the first 2:\n  {jsonl}:2: not UTF-8 text .*\n  {jsonl}:4: "):
        load(jsonl)

    table = tmp_path / "mixed.csv"
    table.write_bytes(b"instruction,output\nSay hi,hi\n" + "Say caf\xe9,\"caf\xe9\nau lait\"\n".encode("latin-1")
                      + b"Say yes,yes\n" + "Say \xe9,\xe9\n".encode("latin-1") + b"Say no,no\n")
    rows, stats = load(table, "alpaca", on_bad_row="skip")
    assert [r.where for r in rows["train"]] == [f"{table}:2", f"{table}:5", f"{table}:7"] and stats.bad_rows == 2
    with pytest.raises(DataError, match=rf"^2 bad rows, the first 2:\n  {table}:3: not UTF-8 text \(column "
                                        rf"'instruction'\); re-save the file as UTF-8 .*\n  {table}:6: "):
        load(table, "alpaca")

    array = tmp_path / "latin.json"
    array.write_bytes(b"[\n" + GOOD.encode() + b",\n" + latin + b"\n]\n")
    with pytest.raises(DataError, match=rf"{array}:3: not UTF-8 text"):
        load(array)


def test_json_file_of_json_lines_is_read_line_by_line_with_bad_rows_named_by_line(tmp_path):
    lines = write(tmp_path, [GOOD, "", json.dumps({"prompt": "x"}), "{broken", GOOD], name="lines.json")
    rows, stats = load(lines, on_bad_row="skip")
    assert [r.where for r in rows["train"]] == [f"{lines}:1", f"{lines}:5"] and stats.bad_rows == 2
    with pytest.raises(DataError, match=rf"^2 bad rows, the first 2:\n  {lines}:3: no 'messages' field \(keys: prompt\)"
                                        rf".*\n  {lines}:4: not valid JSON"):
        load(lines)


@pytest.mark.parametrize("indent", [None, 2], ids=["one-line", "pretty-printed"])
def test_json_file_of_one_object_is_refused_for_its_layout_naming_the_key_that_holds_the_rows(tmp_path, indent):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "train": [json.loads(GOOD)] * 3}, indent=indent), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{wrapped}: one JSON object \(keys: version, train\), not rows; a .json data "
                                        r"file holds an array of objects \(\[\{\.\.\.\}, \{\.\.\.\}\]\) or one object per "
                                        r"line \(JSON lines\): if the rows are the list under 'train', make that list the "
                                        r"whole file; if the object is one row, put it in \[ \]$"):
        load(wrapped)
    row = tmp_path / "row.json"
    row.write_text(json.dumps({"text": "hello"}, indent=indent), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{row}: one JSON object \(keys: text\), not rows; .*\(JSON lines\): if the "
                                        r"object is one row, put it in \[ \]$"):
        load(row, "text")


def test_json_nested_too_deep_is_a_bad_row_not_a_traceback(tmp_path):
    path = write(tmp_path, [GOOD, "[" * 100_000, GOOD])
    rows, stats = load(path, on_bad_row="skip")
    assert len(rows["train"]) == 2 and stats.bad_rows == 1
    with pytest.raises(DataError, match=rf"{path}:2: JSON nested deeper than the reader allows; flatten or remove "
                                        r"the line \(data.sources\[0\], format=messages\)"):
        load(path)
    array = tmp_path / "deep.json"
    array.write_text(f"[{GOOD}, {{\"messages\": {'[' * 100_000}}}]")
    with pytest.raises(DataError, match=rf"{array}: JSON nested deeper than the reader allows"):
        load(array)


@pytest.mark.parametrize("fmt, row, field", [
    ("alpaca", {"instruction": "q", "input": "", "output": " "}, "output"),
    ("prompt_completion", {"prompt": "q", "completion": ""}, "completion"),
])
def test_an_empty_answer_field_is_named_as_the_field_it_is(tmp_path, fmt, row, field):
    """It was named as a position in a list of messages the row does not have: output[1]."""
    path = write(tmp_path, [json.dumps(row)])
    with pytest.raises(DataError) as info:
        load(path, fmt)
    assert f"{path}:1: field '{field}' is empty; fill it in or drop the row" in str(info.value)


def test_a_data_path_that_is_a_pipe_device_or_folder_says_what_it_is(tmp_path):
    """A named pipe, or a link to /dev/zero, was said to be not found; reading either would never end."""
    import os

    from loraforge.data.sources import source_problems

    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    (tmp_path / "folder.jsonl").mkdir()
    config = DataConfig.model_validate({"sources": [{"path": str(tmp_path / name)}
                                                    for name in ("pipe.jsonl", "zero.jsonl", "folder.jsonl")]})
    assert source_problems(config.sources) == [
        f"data.sources[0].path: {tmp_path / 'pipe.jsonl'}: a named pipe, not a data file; point at a .jsonl, .json, "
        ".csv or .parquet file",
        f"data.sources[1].path: {tmp_path / 'zero.jsonl'}: a character device, not a data file; point at a .jsonl, "
        ".json, .csv or .parquet file",
        f"data.sources[2].path: {tmp_path / 'folder.jsonl'}: a folder, not a data file; point at a .jsonl, .json, "
        ".csv or .parquet file"]
