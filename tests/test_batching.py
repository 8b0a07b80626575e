"""Batching helpers against brute-force references: every row once, every real token inside its
batch's columns, widths on the bucket grid, windows kept."""
import numpy as np
import pytest

from swiftjax.batching import length_batches, padded_batches, prompt_batches, round_up, row_spans


def _mask(rs, n, t):
    """Rows of random spans: left padding, right padding, both, full and empty rows."""
    m = np.zeros((n, t), np.int32)
    for i in range(n):
        a = rs.randint(0, t)
        b = rs.randint(a, t + 1)
        m[i, a:b] = 1
    m[0] = 1
    m[1] = 0
    return m


def test_row_spans_match_a_loop():
    m = _mask(np.random.RandomState(0), 20, 17)
    first, end = row_spans(m)
    for i, row in enumerate(m):
        real = np.flatnonzero(row)
        assert (first[i], end[i]) == ((real[0], real[-1] + 1) if real.size else (0, 0))


@pytest.mark.parametrize("n, bs, bucket, window", [(37, 4, 8, None), (37, 4, 8, 12), (5, 8, 16, None),
                                                   (37, 5, 1, 10), (64, 8, 64, None)])
def test_length_batches_cover_rows_and_tokens(n, bs, bucket, window):
    rs = np.random.RandomState(n + bs)
    t = 50
    m = _mask(rs, n, t)
    batches = length_batches(m, bs, bucket=bucket, window=window)
    rows = np.concatenate([r for r, _, _ in batches])
    assert sorted(rows[rows >= 0].tolist()) == list(range(n))  # every row exactly once
    win = window or -(-n // bs) * bs
    lengths = m.sum(1)
    for k, (r, start, width) in enumerate(batches):
        assert r.shape == (bs,) and 0 <= start and start + width <= t
        assert width == t or width % bucket == 0
        real = r[r >= 0]
        assert real.size and len({int(i) // win for i in real}) == 1       # one window
        inside = np.zeros(t, bool)
        inside[start: start + width] = True
        assert not np.any(m[real][:, ~inside])                                # every real token kept
        span = max(np.flatnonzero(m[i])[-1] + 1 if lengths[i] else 0 for i in real) - \
            min(np.flatnonzero(m[i])[0] if lengths[i] else t for i in real)
        assert width < max(span, 1) + bucket                                 # no more than one bucket of slack
    # inside a window rows come shortest span first
    first, end = row_spans(m)
    for w0 in range(0, n, win):
        order = [i for i in rows if i >= 0 and w0 <= i < w0 + win]
        spans = (end - first)[order]
        assert np.all(np.diff(spans) >= 0)


def test_length_batches_without_bucket_is_padded_batches():
    m = _mask(np.random.RandomState(3), 11, 9)
    got = length_batches(m, 4, bucket=None)
    for (r, start, width), ref in zip(got, padded_batches(11, 4), strict=True):
        np.testing.assert_array_equal(r, ref)
        assert (start, width) == (0, 9)


def test_length_batches_cut_short_rows():
    m = np.zeros((8, 256), np.int32)
    m[:4, :20] = 1           # short, right-padded
    m[4:, 100:] = 1          # long, left-padded
    (r0, s0, w0), (r1, s1, w1) = length_batches(m, 4, bucket=32)
    assert sorted(r0) == [0, 1, 2, 3] and (s0, w0) == (0, 32)
    assert sorted(r1) == [4, 5, 6, 7] and s1 + w1 == 256 and w1 == 160


@pytest.mark.parametrize("kw, match", [({"bucket": 0}, "bucket"), ({"bucket": 2.0}, "bucket"),
                                        ({"window": 6}, "window"), ({"window": 0}, "window")])
def test_length_batches_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        length_batches(np.ones((4, 8)), 4, **kw)
    with pytest.raises(ValueError, match="attention_mask"):
        length_batches(np.ones(8), 4)


def test_round_up():
    assert [round_up(w, 64, 200) for w in (0, 1, 64, 65, 190, 199)] == [1, 64, 64, 128, 192, 200]
    assert round_up(5, None, 40) == 40


def _pairs(prompts, responses, t=32):
    """encode_pairs' layout: prompt then response, right-padded."""
    ids = np.zeros((len(prompts), t), np.int32)
    attn = np.zeros_like(ids)
    resp = np.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = p + r
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p): len(p) + len(r)] = 1
    return ids, attn, resp


def test_prompt_batches_group_runs_of_one_prompt():
    a, b = [5, 6, 7], [8, 9]
    lens = [4, 1, 9, 2, 3, 7]
    prompts = [a, a, a, b, b, a]              # the last row repeats prompt a after b: its own run
    ids, attn, resp = _pairs(prompts, [[3] * n for n in lens])
    width, batches = prompt_batches(ids, attn, resp, 2, bucket=4)
    assert width == 4                          # longest prompt 3, rounded up to the bucket
    got = [(list(b.rows), b.prompt_row, b.width) for b in batches]
    # each run sorted by response length, cut into batches of 2, width = longest response rounded up
    assert got == [([1, 0], 0, 4), ([2, -1], 0, 12), ([3, 4], 3, 4), ([5, -1], 5, 8)]
    # every row once; a batch's rows share its prompt row's prompt
    rows = np.concatenate([b.rows for b in batches])
    assert sorted(rows[rows >= 0]) == list(range(len(lens)))
    assert prompt_batches(ids, attn, resp, 2, bucket=None)[1][1].width == 9


@pytest.mark.parametrize("case", ["no_sharing", "response_not_tail", "empty_response", "no_prompt"])
def test_prompt_batches_refuse_other_layouts(case):
    prompts = [[5, 6], [5, 6], [7], [7]]
    responses = [[3, 4], [3], [4, 4, 4], [9]]
    if case == "no_sharing":
        prompts = [[i + 3] for i in range(4)]
    if case == "empty_response":
        responses[2] = []
    if case == "no_prompt":
        prompts[0] = prompts[1] = []
    ids, attn, resp = _pairs(prompts, responses)
    if case == "response_not_tail":
        attn[0, 4] = 1                         # a real token after row 0's response
    assert prompt_batches(ids, attn, resp, 2) is None
