"""An allocation failure outside a training step (model loading, caching) is still exit 6 with an error event."""
from __future__ import annotations

import io
import json

from lora_trainer import cli
from lora_trainer.contract.errors import EXIT_OUT_OF_MEMORY


def test_memory_error_while_loading_is_exit_6(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"dataset_path": str(tmp_path / "d"), "base_model": "x/y", "output_path": str(tmp_path / "o"),
                               "trigger_words": ["ohwx"]}))

    def fail(cfg, warnings, events, args):
        events.set_phase("loading_model")
        raise MemoryError("cannot allocate 12 GiB")

    out = io.StringIO()
    monkeypatch.setattr(cli, "_train", fail)
    monkeypatch.setattr(cli, "claim_stdout", lambda: out)
    assert cli.main(["--config", str(cfg)]) == EXIT_OUT_OF_MEMORY
    (err,) = [json.loads(line) for line in out.getvalue().splitlines() if json.loads(line)["type"] == "error"]
    assert err["code"] == "out_of_memory" and err["exit_code"] == 6
    assert err["message"].startswith("out of host memory while loading model")
    assert err["details"] == {"where": "host", "phase": "loading_model"}
    monkeypatch.setattr(cli, "_train", lambda *a: (_ for _ in ()).throw(ValueError("a bug")))
    assert cli.main(["--config", str(cfg)]) == 1  # any other exception stays internal_error
