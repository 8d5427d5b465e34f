"""Router supervision [ours]: per-token route targets in the data, gates collected with their
graph, and the auxiliary loss that pulls them toward the example's domain. Ray-free."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_model_common import layer_config, randomise_adapters, tiny_model, token_batch

from modula.data.encode import ROUTE_TARGETS, pack, tokenize_batch, tokenizer_files
from modula.data.tokenizer import train_tokenizer
from modula.model import attach_modula
from modula.trainers.loop import route_supervision_loss
from modula.trainers.runner import route_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_route_targets_per_variant():
    assert route_targets("flan", ["code", "math"]) == {"general": 0, "code": 1, "math": 2}
    assert route_targets("res", ["code", "math"]) == {"code": 0, "math": 1}  # general: none


def test_pack_carries_route_targets_and_pads_them():
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], ROUTE_TARGETS: [1, 1, 1]},
           {"input_ids": [8, 9], "labels": [-100, 9], ROUTE_TARGETS: [0, 0]},
           {"input_ids": [3, 4, 5, 6], "labels": [-100, 4, 5, 6], ROUTE_TARGETS: [2, 2, 2, 2]}]
    p = pack(exs, 6, pad_id=0)
    assert p[ROUTE_TARGETS].tolist() == [[1, 1, 1, 0, 0, -100], [2, 2, 2, 2, -100, -100]]
    assert p["input_ids"].tolist()[0] == [5, 6, 7, 8, 9, 0]
    plain = pack([{k: v for k, v in e.items() if k != ROUTE_TARGETS} for e in exs], 6, 0)
    assert ROUTE_TARGETS not in plain


def test_tokenize_batch_labels_every_token_with_its_domain(tmp_path):
    tok = train_tokenizer(["what is two plus two", "convert three km to m", "hello there"] * 5,
                          300, tmp_path)
    files = tokenizer_files(tmp_path)
    batch = {"prompt": np.array(["what is two plus two", "hello", "convert km"]),
             "response": np.array(["four", "hi", "3000 m"]),
             "domain": np.array(["math", "general", "units"])}
    from modula.data.encode import _files_digest

    out = tokenize_batch(batch, files=files, digest=_files_digest(files), max_length=64,
                         train_on_prompt=False, do_pack=False,
                         route_columns={"math": 1, "units": 2, "general": 0})
    real = out["input_ids"] != tok.pad_token_id
    for row, want in enumerate([1, 0, 2]):
        assert set(out[ROUTE_TARGETS][row][real[row]].tolist()) == {want}
    res = tokenize_batch(batch, files=files, digest=_files_digest(files), max_length=64,
                         train_on_prompt=False, do_pack=False, route_columns={"math": 0, "units": 1})
    assert set(res[ROUTE_TARGETS][1].tolist()) == {-100}  # general has no Res target


def test_loss_values():
    E = 3
    targets = torch.tensor([[0, 1, -100]])
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2]]), E).float()
    assert float(route_supervision_loss([one_hot], targets)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 3, E), 1 / E)
    assert float(route_supervision_loss([uniform, uniform], targets)) == pytest.approx(math.log(E))
    assert float(route_supervision_loss([uniform], torch.full((1, 3), -100))) == 0.0
    with pytest.raises(ValueError, match="no router gates"):
        route_supervision_loss([], targets)


@pytest.mark.parametrize("variant", ["flan", "res"])
def test_collected_gates_train_the_routers_toward_the_target(variant):
    model = attach_modula(tiny_model("llama", 0), layer_config(variant), ["code", "math"])
    randomise_adapters(model)
    model.set_stage("router")
    ids = token_batch(2, 6)
    col = 1 if variant == "res" else 2  # math
    targets = torch.full((2, 6), col)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    first = None
    for _ in range(30):
        with model.collect_router_gates() as gates:
            model(input_ids=ids)
        assert len(gates) == len(model.modula_layers()) and gates[0].requires_grad
        loss = route_supervision_loss(gates, targets)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.3 * first
    model.set_stage(None)
    with torch.no_grad(), model.capture_gates():
        model(input_ids=ids)
    assert float(model.mean_gates()[:, col].min()) > 0.6
