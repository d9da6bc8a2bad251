"""Session separators: where they go in a history (device and trainer share one function),
the vocabulary's reserved id, the training chunks with the basket objective's anchors, and
the evaluation rows a session-aware model sees."""

import numpy as np
import pytest
import torch

import model_zoo
from device_sdk.item_vocab import ItemVocab
from device_sdk.sessions import (
    SESSION_KEY,
    session_histories,
    session_targets,
    session_tokens,
    session_window,
)
from trainer.data.split import EvalSet, LeaveLastOut, with_sessions

SEP = 9


def test_separators_go_between_sessions_and_before_a_late_request():
    ids = np.array([1, 2, 3, 4, 5])
    times = np.array([0, 60, 4000, 4100, 9000])
    assert session_tokens(ids, times, SEP, 1800).tolist() == [1, 2, SEP, 3, 4, SEP, 5]
    # The request opens a session only when it comes more than the gap after the last step.
    assert session_tokens(ids, times, SEP, 1800, now=9000 + 1800).tolist()[-1] == 5
    assert session_tokens(ids, times, SEP, 1800, now=9000 + 1801).tolist()[-2:] == [5, SEP]
    assert session_tokens(ids[:0], times[:0], SEP, 1800, now=1e9).tolist() == []
    tokens = session_tokens(ids, times, SEP, 1800)
    assert session_targets(tokens, SEP).tolist() == [2, 0, 3, 4, 0, 5]
    window = session_window(ids, times, SEP, 1800, 20000, 4)
    assert window.tolist() == [4, SEP, 5, SEP] and window.dtype == np.int32
    assert session_window(ids[:1], times[:1], SEP, 1800, 0, 4).tolist() == [0, 0, 0, 1]
    for bad in ((0, 1800), (SEP, 0)):
        with pytest.raises(ValueError, match="separator and gap"):
            session_tokens(ids, times, *bad)
    with pytest.raises(ValueError, match="one length"):
        session_tokens(ids, times[:-1], SEP, 1800)


def test_padded_rows_get_the_same_separators_as_their_steps():
    history = np.array([[0, 0, 1, 2, 3], [0, 0, 0, 0, 0]], dtype=np.int32)
    times = np.array([[0, 0, 10, 20, 5000], [0, 0, 0, 0, 0]])
    out = session_histories(history, times, np.array([5001, 7]), SEP, 1800)
    assert out.tolist() == [[0, 1, 2, SEP, 3], [0, 0, 0, 0, 0]]
    rows = EvalSet(["a", "b"], history, np.array([4, 4]), times, np.array([9000, 7]))
    seen = with_sessions(rows, SEP, 1800)
    assert seen.history.tolist() == [[1, 2, SEP, 3, SEP], [0, 0, 0, 0, 0]]
    assert seen.target.tolist() == [4, 4] and rows.history[0].tolist() == [0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="request times"):
        with_sessions(EvalSet(["a"], history[:1], np.array([4])), SEP, 1800)


def test_the_vocabulary_reserves_the_separator_as_its_last_id():
    vocab = ItemVocab.from_items(["b", "a", "b", SESSION_KEY])
    assert vocab.keys == ["", "b", "a"] and vocab.session_id == 0
    vocab.popular = [1, 2]
    sep = vocab.with_session()
    assert sep.keys[-1] == SESSION_KEY and sep.session_id == 3 and sep.popular == [1, 2]
    assert sep.with_session() is sep
    assert sep.id_of(SESSION_KEY) == 0  # a logged key never becomes the separator
    assert sep.ids([SESSION_KEY, "a"]).tolist() == [0, 2]
    assert ItemVocab.from_json(sep.to_json()).session_id == 3
    assert sep.digest() != vocab.digest()
    with pytest.raises(ValueError, match="session separator excluded"):
        ItemVocab(sep.keys, popular=[3])


def test_training_chunks_anchor_each_target_at_its_sessions_separator():
    empty = EvalSet([], np.zeros((0, 5), np.int32), np.zeros(0, np.int32))
    split = LeaveLastOut(train={"u": np.arange(1, 8, dtype=np.int32)}, valid=empty, test=empty,
                         train_times={"u": np.array([0, 0, 0, 5000, 5000, 9000, 9001])})
    inputs, targets, anchors = split.train_session_sequences(5, SEP, 1800)
    # tokens 1 2 3 | 4 5 | 6 7, cut from the end into chunks of 5
    assert inputs.tolist() == [[SEP, 4, 5, SEP, 6], [0, 0, 1, 2, 3]]
    assert targets.tolist() == [[4, 5, 0, 6, 7], [0, 0, 2, 3, 0]]
    assert anchors.tolist() == [[0, 0, -1, 3, 3], [-1, -1, -1, -1, -1]]
    rows, cols = np.nonzero(anchors >= 0)
    assert (inputs[rows, anchors[rows, cols]] == SEP).all()  # every anchor is a separator
    with pytest.raises(ValueError, match="times"):
        LeaveLastOut(train=split.train, valid=empty, test=empty).train_session_sequences(
            5, SEP, 1800)


def test_the_basket_objective_scores_each_session_item_from_its_separator():
    from trainer.train import _session_loss

    arch = model_zoo.get("repeat_sasrec")
    config = arch.config(n_items=12, dim=8, hidden=8, max_len=5, dropout=0.0, session_id=11,
                         session_gap=1800)
    torch.manual_seed(0)
    module = arch.torch_module(config)
    x = torch.tensor([[11, 4, 5, 11, 6], [0, 0, 1, 2, 3]])
    y = torch.tensor([[4, 5, 0, 6, 7], [0, 0, 2, 3, 0]])
    anchor = torch.tensor([[0, 0, -1, 3, 3], [-1, -1, -1, -1, -1]])
    logp = torch.log_softmax(module.sequence_logits(x), -1)
    line = -(logp[0, 0, 4] + logp[0, 1, 5] + logp[0, 3, 6] + logp[0, 4, 7]
             + logp[1, 2, 2] + logp[1, 3, 3]) / 6
    basket = -(logp[0, 0, 4] + logp[0, 0, 5] + logp[0, 3, 6] + logp[0, 3, 7]) / 4
    assert _session_loss(module, x, y, anchor, 0.0).item() == pytest.approx(line.item(),
                                                                            rel=1e-6)
    assert _session_loss(module, x, y, anchor, 0.5).item() == pytest.approx(
        (line + 0.5 * basket).item(), rel=1e-6)
    # The separator is never ranked: its logit sits with padding's.
    assert (module(x)[:, 11] < -1e8).all() and (module(x)[:, 0] < -1e8).all()


def test_held_out_rows_carry_the_request_time():
    """``at``: the held-out line's time (line protocol) or the basket's (basket protocol),
    what a session-aware model's closing separator is decided by."""
    from trainer.data.split import basket_holdout, leave_last_out

    ids = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32)
    times = np.array([0, 0, 5000, 5000, 9000, 9000])
    split = basket_holdout({"u": (ids, times)}, {"u": (9000, np.array([5, 6]))}, 4)
    assert split.test.at.tolist() == [9000] and split.test.target.tolist() == [6]
    assert split.valid.at.tolist() == [5000] and split.valid.target.tolist() == [4]
    assert split.basket.at.tolist() == [9000]
    assert split.basket_valid.at.tolist() == [5000]
    # The basket opens a visit: its history closes with a separator; the line does not.
    assert with_sessions(split.basket, SEP, 1800).history.tolist() == [[SEP, 3, 4, SEP]]
    assert with_sessions(split.test, SEP, 1800).history.tolist() == [[3, 4, SEP, 5]]
    line = leave_last_out({"u": ids}, 4, {"u": times})
    assert line.test.at.tolist() == [9000] and line.valid.at.tolist() == [9000]
    assert line.valid.subset(1).at.tolist() == [9000]
