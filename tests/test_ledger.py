import json
import os
import threading

import pytest

from loraforge import ledger


def test_two_processes_recording_at_once_each_keep_their_entry(tmp_path, monkeypatch):
    """Two evals of one run ending together: each reads the ledger, adds its file and writes it back. Both read
    before either wrote (held here at a barrier), and the second write lost the first's entry; the folder's lock
    makes the second wait for the first's write."""
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(name)
    both_read = threading.Barrier(2, timeout=1.0)
    real_read = ledger.read

    def read_then_wait(folder):
        found = real_read(folder)
        try:
            both_read.wait()
        except threading.BrokenBarrierError:
            pass
        return found

    monkeypatch.setattr(ledger, "read", read_then_wait)
    writers = [threading.Thread(target=ledger.record, args=(tmp_path, [name])) for name in ("a.json", "b.json")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=30)
    monkeypatch.setattr(ledger, "read", real_read)
    assert sorted(ledger.read(tmp_path)["files"]) == ["a.json", "b.json"]
    assert ledger.written(tmp_path, "a.json") and ledger.written(tmp_path, "b.json")


def test_the_ledger_is_replaced_whole_and_leaves_nothing_beside_it(tmp_path, monkeypatch):
    """A write that fails midway (a full disk) leaves the ledger as it was, not cut short: cut short, every file
    it listed would read as one loraforge did not write, never to be rewritten."""
    (tmp_path / "a.json").write_text("a")
    ledger.record(tmp_path, ["a.json"])
    before = (tmp_path / ledger.LEDGER).read_text()
    (tmp_path / "b.json").write_text("b")

    real_fdopen = os.fdopen

    class HalfWritten:
        def __init__(self, fd, *args, **kwargs):
            self.file = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", HalfWritten)
    with pytest.raises(OSError, match="No space left"):
        ledger.record(tmp_path, ["b.json"])
    monkeypatch.undo()
    assert (tmp_path / ledger.LEDGER).read_text() == before
    assert json.loads(before)["files"].keys() == {"a.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [ledger.LEDGER, "a.json", "b.json"]
