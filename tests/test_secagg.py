"""SecAgg+ math and protocol in one process (device_sdk.secagg, real cryptography): Shamir,
the PRG, quantization bounds, the neighbour graph, parameter refusals, exact unmasking with
dropouts at every stage (10 and 100 devices), and the attacks a curious server could try
with everything it receives. The same rounds over HTTP: test_secagg_rounds.py."""

import contextlib
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_sdk import secagg
from device_sdk.protocol import b64, b64decode, device_id_for

ROUND = "round-7"


# --- primitives ------------------------------------------------------------------------


def test_any_t_shares_rebuild_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    xs = list(range(1, 8))
    shares = secagg.shamir_split(secret, 4, xs)
    points = list(zip(xs, shares, strict=True))
    for subset in itertools.combinations(points, 4):
        assert secagg.shamir_combine(subset) == secret
    for subset in itertools.combinations(points, 3):
        with contextlib.suppress(ValueError):  # or a value beyond 256 bits
            assert secagg.shamir_combine(subset) != secret


def test_a_wrong_share_is_skipped_when_the_secret_can_be_checked():
    secret = bytes(32 * [7])
    xs = [1, 2, 3, 4, 5]
    points = list(zip(xs, secagg.shamir_split(secret, 3, xs), strict=True))
    points[0] = (1, bytes(secagg.SHARE_BYTES))  # a device revealed garbage
    assert secagg.combine_checked(points, 3, lambda s: s == secret) == secret
    assert secagg.combine_checked(points[:3], 3, lambda s: s == secret) is None


def test_prg_is_deterministic_per_seed_and_refuses_short_seeds():
    a, b = secagg.prg(bytes(32), 1000), secagg.prg(bytes(31) + b"\1", 1000)
    assert np.array_equal(a, secagg.prg(bytes(32), 1000)) and not np.array_equal(a, b)
    assert a.dtype == np.uint32 and len(set(a.tolist())) > 990
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.prg(bytes(16), 10)  # never a seed shorter than 128 bits, let alone this


def test_stochastic_rounding_is_unbiased_and_off_by_less_than_one_unit():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 200_000)
    q = secagg.quantize(x, 1000.0, rng)
    error = q / 1000.0 - x
    assert np.all(np.abs(error) < 1 / 1000.0)
    assert abs(error.mean()) < 5 * (1 / 1000.0) / math.sqrt(12 * x.size)


def test_the_scale_keeps_the_worst_case_sum_inside_the_ring():
    for clip, n, noise in ((1.0, 10, 0.0), (0.5, 1000, 0.0), (2.0, 100, 3.0)):
        scale = secagg.quantization_scale(clip, n, noise)
        worst = n * (clip * scale + 1) + secagg.OVERFLOW_SDS * noise * clip * scale
        assert worst < 2**31 <= 2 * worst  # safe, and not wastefully small
    # n devices at +C in one coordinate and -C in another: no wrap-around either way.
    n, clip = 50, 1.0
    scale = secagg.quantization_scale(clip, n)
    rng = np.random.default_rng(1)
    ring = np.zeros(2, dtype=np.uint32)
    for _ in range(n):
        ring += secagg.to_ring(secagg.quantize(np.array([clip, -clip]), scale, rng))
    assert np.allclose(secagg.dequantize(ring, scale), [n * clip, -n * clip], atol=n / scale)


def test_discrete_gaussian_has_the_asked_variance():
    rng = np.random.default_rng(2)
    for sigma in (0.8, 3.5, 1e5):
        x = secagg.discrete_gaussian(sigma, 100_000, rng)
        assert x.dtype == np.int64 and np.all(x == np.round(x))
        assert abs(x.var() / sigma**2 - 1) < 0.03
        assert abs(x.mean()) < 5 * sigma / math.sqrt(x.size)


def test_the_graph_is_symmetric_regular_and_the_same_everywhere():
    ids = [f"{i:032x}" for i in range(60)]
    graph = secagg.neighbour_graph(ids, 10, bytes(32))
    assert graph == secagg.neighbour_graph(reversed(ids), 10, bytes(32))
    assert graph != secagg.neighbour_graph(ids, 10, bytes(31) + b"\1")
    for u, neighbours in graph.items():
        assert len(neighbours) == 10 and u not in neighbours
        assert all(u in graph[v] for v in neighbours)
    assert all(secagg.neighbours_of(ids, 10, bytes(32), u) == graph[u] for u in ids)
    complete = secagg.neighbour_graph(ids[:8], 7, bytes(32))
    assert all(len(v) == 7 for v in complete.values())


def test_default_degree_grows_like_log_n_and_meets_its_targets():
    degrees = {n: secagg.default_degree(n) for n in (10, 100, 1000, 10_000, 100_000)}
    assert degrees[10] == 9 and degrees[100] == 99  # small rounds: the complete graph
    assert degrees[1000] < 1000 / 4
    # each 10x more devices adds a roughly constant number of neighbours (log n)
    steps = [degrees[10 * n] - degrees[n] for n in (1000, 10_000)]
    assert all(0 < s < 60 for s in steps)
    for n, k in degrees.items():  # a complete graph is the most robust there is
        r = secagg.risks(n, k, secagg.default_threshold(k))
        assert k == n - 1 or r["failure"] <= secagg.ROBUSTNESS_TARGET
        assert k == n - 1 or r["exposure"] <= secagg.SECURITY_TARGET


@pytest.mark.parametrize("n,degree,threshold,why", [
    (2, 1, 1, "fewer than 3"),
    (20, 10, 5, "threshold 5 must be in"),     # t <= k/2
    (20, 10, 11, "threshold 11 must be in"),   # t > k
    (20, 9, 5, "must be even"),
    (1000, 4, 3, "probability"),                # too sparse: colluders fill a neighbourhood
])
def test_unsafe_parameters_are_refused(n, degree, threshold, why):
    with pytest.raises(secagg.SecAggError, match=why) as caught:
        secagg.check_graph(n, degree, threshold)
    assert caught.value.code == "secagg_unsafe"


# --- a whole round in one process ----------------------------------------------------------


@dataclass
class Round:
    """Every device and everything the server received, stage by stage."""

    n: int
    length: int
    clip: float = 1.0
    min_clients: int = 3
    seed: int = 0
    identities: dict = field(default_factory=dict)
    devices: dict = field(default_factory=dict)
    vectors: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)
    adverts: dict = field(default_factory=dict)
    shares: dict = field(default_factory=dict)  # sender -> {recipient: ciphertext}
    masked: dict = field(default_factory=dict)
    reveals: dict = field(default_factory=dict)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        self.scale = secagg.quantization_scale(self.clip, self.n)
        self.params = secagg.TaskParams(self.scale, self.length, self.min_clients)
        for _ in range(self.n):
            key = Ed25519PrivateKey.generate()
            raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            u = device_id_for(raw)
            self.identities[u] = raw
            self.devices[u] = secagg.SecAggDevice(ROUND, u, key, self.params)
            v = self.rng.normal(size=self.length)
            self.vectors[u] = v * min(1.0, self.clip / np.linalg.norm(v))
        self.ids = sorted(self.devices)

    def advertise(self, who):
        self.adverts = {u: self.devices[u].advertise() for u in who}
        self.u1 = sorted(self.adverts)
        self.degree = secagg.default_degree(len(self.u1))
        self.threshold = secagg.default_threshold(self.degree)
        self.graph_seed = self.rng.bytes(32)
        self.graph = secagg.neighbour_graph(self.u1, self.degree, self.graph_seed)

    def roster(self, u):
        return {"participants": self.u1, "degree": self.degree, "threshold": self.threshold,
                "graph_seed": b64(self.graph_seed),
                "adverts": {v: {"identity": b64(self.identities[v]), "advert": self.adverts[v]}
                            for v in (*self.graph[u], u)}}

    def share_keys(self, who):
        self.shares = {u: self.devices[u].share_keys(self.roster(u))["shares"] for u in who}
        self.u2 = set(self.shares)

    def inbox(self, u):
        return {"u2": sorted(self.u2),
                "shares": {s: self.shares[s][u] for s in self.u2 if u in self.shares[s]}}

    def masked_input(self, who):
        for u in who:
            seed = int.from_bytes(u.encode()[:8], "big")
            self.masked[u] = self.devices[u].masked_input(
                self.inbox(u), self.vectors[u], rng=np.random.default_rng(seed))
            self.quantized[u] = secagg.to_ring(secagg.quantize(
                self.vectors[u], self.scale, np.random.default_rng(seed)))
        self.u3 = set(self.masked)

    def unmask(self, who):
        for u in who:
            answer = self.devices[u].unmask({"u3": sorted(self.u3)})
            mine = set(self.graph[u]) & self.u2
            self.reveals[u] = secagg.parse_reveal(answer, mine & self.u3, mine - self.u3)

    def parsed_adverts(self):
        return {u: {k: b64decode(a[k]) for k in ("c_pk", "e_pk", "b_commit")}
                for u, a in self.adverts.items()}

    def server_sum(self):
        total = np.zeros(self.length, dtype=np.uint32)
        for u in self.u3:
            total += self.masked[u]
        return secagg.unmask_sum(round_id=ROUND, masked_sum=total, graph=self.graph,
                                 adverts=self.parsed_adverts(), u2=self.u2, u3=self.u3,
                                 reveals=self.reveals, threshold=self.threshold)


def _survivors(ids, rate, rng):
    drop = set(rng.choice(ids, size=round(rate * len(ids)), replace=False).tolist())
    return [u for u in ids if u not in drop]


def run(n, stage, rate, length=64, seed=0):
    """One round where ``rate`` of the devices still in it drop at ``stage``."""
    r = Round(n, length, seed=seed)
    rng = np.random.default_rng(seed + 1)
    everyone = r.ids
    r.advertise(_survivors(everyone, rate, rng) if stage == "advertise" else everyone)
    r.share_keys(_survivors(r.u1, rate, rng) if stage == "share_keys" else r.u1)
    r.masked_input(_survivors(sorted(r.u2), rate, rng) if stage == "masked_input"
                   else sorted(r.u2))
    r.unmask(_survivors(sorted(r.u3), rate, rng) if stage == "unmasking" else sorted(r.u3))
    return r


@pytest.mark.parametrize("n", [10, 100])
@pytest.mark.parametrize("stage,rate", [("advertise", 0.0)] + [
    (s, p) for s in ("advertise", "share_keys", "masked_input", "unmasking")
    for p in (0.1, 0.3)])
def test_dropout_matrix_unmasks_exactly_the_survivors_sum(n, stage, rate):
    r = run(n, stage, rate)
    expected = sum((r.quantized[u] for u in r.u3), np.zeros(r.length, dtype=np.uint32))
    unmasked = r.server_sum()
    assert np.array_equal(unmasked, expected)  # exact, modulo 2^32
    assert len(r.u3) == n - (round(rate * n) if stage != "unmasking" else 0)
    floats = sum(r.vectors[u] for u in r.u3)
    error = np.abs(secagg.dequantize(unmasked, r.scale) - floats)
    assert error.max() < len(r.u3) / r.scale  # the documented bound


def test_below_the_threshold_the_round_fails_without_unmasking():
    r = Round(10, 32)
    r.advertise(r.ids)
    r.share_keys(r.u1)
    r.masked_input(sorted(r.u2))
    r.unmask(sorted(r.u3)[: r.threshold - 1])  # t - 1 devices answer
    with pytest.raises(secagg.SecAggError) as caught:
        r.server_sum()
    assert caught.value.code == "secagg_unrecoverable"


# --- what a curious server can do with what it received --------------------------------------


def _best_guess(r, u, dropped_keys):
    """y_u minus every mask the server can compute: u's self mask when it has >= t b shares
    of u, and the pairwise masks with devices whose c key it rebuilt."""
    guess = r.masked[u].copy()
    index = secagg.participant_index(r.u1)
    adverts = r.parsed_adverts()
    b_points = [(index[h], s["b"][u]) for h, s in r.reveals.items() if u in s["b"]]
    b = secagg.combine_checked(b_points, r.threshold, lambda s: secagg.self_mask_commitment(
        ROUND, u, s) == adverts[u]["b_commit"]) if len(b_points) >= r.threshold else None
    if b is not None:
        guess -= secagg.prg(b, r.length)
    for d, c in dropped_keys.items():
        if u in r.graph[d]:
            seed = secagg.mask_seed(c, adverts[u]["c_pk"], ROUND, d, u)
            if secagg.pair_sign(u, d) > 0:
                guess -= secagg.prg(seed, r.length)
            else:
                guess += secagg.prg(seed, r.length)
    return guess


def _rebuilt_keys(r):
    index = secagg.participant_index(r.u1)
    keys = {}
    for d in r.u2 - r.u3:
        points = [(index[h], s["c"][d]) for h, s in r.reveals.items() if d in s["c"]]
        keys[d] = secagg.shamir_combine(points[: r.threshold])
    return keys


def _looks_random(guess, quantized):
    """The guess is unrelated to the true quantized update: it still carries a mask that is
    uniform on the ring, so it is off by more than 2**24 at nearly every value (a uniform
    error lands that close with probability 2**-7; at most a quarter of the values may), and
    its correlation with the truth is within 8 standard errors of 0 (sd 1 / sqrt(length)).
    A truly masked guess fails either bound by chance with probability below 1e-14, so the
    test cannot flake."""
    error = secagg.centered(guess - quantized).astype(float)
    close = np.abs(error) < 2.0 ** 24
    g, q = secagg.centered(guess).astype(float), secagg.centered(quantized).astype(float)
    bound = 8 / math.sqrt(len(guess))
    return close.mean() < 0.25 and abs(np.corrcoef(g, q)[0, 1]) < bound


def test_the_servers_whole_view_reveals_no_single_update():
    r = run(30, "masked_input", 0.1, length=256)
    keys = _rebuilt_keys(r)
    assert keys  # the server rebuilt dropped devices' mask keys, as the protocol intends
    some = sorted(r.u3)[0]  # the check catches an update left unmasked, even off by one
    assert not _looks_random(r.quantized[some] + np.uint32(1), r.quantized[some])
    for u in r.u3:  # survivors: self mask removable, pairwise masks with survivors are not
        assert _looks_random(_best_guess(r, u, keys), r.quantized[u])
    # Sum minus the others: the result is the sum, so "total - sum of others' guesses" for
    # one device would need every other device's unmasked input, which is the same problem.
    others = [u for u in r.u3][1:]
    total = r.server_sum()
    guess = total - sum((_best_guess(r, u, keys) for u in others),
                        np.zeros(r.length, dtype=np.uint32))
    assert _looks_random(guess, r.quantized[sorted(r.u3)[0]])


def test_a_late_masked_input_from_a_dropped_device_stays_masked():
    r = run(20, "masked_input", 0.3, length=256)
    late = sorted(r.u2 - r.u3)[0]
    # The dropped device computes its masked input anyway; it reaches the server after the
    # server asked the survivors for its c key (so every pairwise mask is removable).
    seed = int.from_bytes(late.encode()[:8], "big")
    r.masked[late] = r.devices[late].masked_input(r.inbox(late), r.vectors[late],
                                                  rng=np.random.default_rng(seed))
    quantized = secagg.to_ring(secagg.quantize(r.vectors[late], r.scale,
                                               np.random.default_rng(seed)))
    # Its self mask stays: survivors reveal c shares of dropped devices, never b shares.
    assert not any(late in s["b"] for s in r.reveals.values())
    assert _looks_random(_best_guess(r, late, _rebuilt_keys(r)), quantized)


def test_a_device_answers_each_stage_once_so_it_never_reveals_both_secrets():
    r = run(10, "advertise", 0.0)
    u = r.ids[0]
    with pytest.raises(secagg.SecAggError, match="answered once") as caught:
        r.devices[u].unmask({"u3": sorted(r.u3 - {r.ids[1]})})  # "now say ids[1] dropped"
    assert caught.value.code == "secagg_refused"
    with pytest.raises(secagg.SecAggError, match="answered once"):
        r.devices[u].share_keys(r.roster(u))  # a replayed stage


def test_devices_refuse_forged_replayed_and_unsafe_rosters():
    r = Round(8, 16)
    r.advertise(r.ids)
    u, v = r.ids[0], r.ids[1]

    def refused(roster, code):
        device = secagg.SecAggDevice(ROUND, u, Ed25519PrivateKey.generate(), r.params)
        device.advertise()
        # the keys it advertised in r (so only the roster's flaw can cause a refusal)
        device._c_key, device._e_key = r.devices[u]._c_key, r.devices[u]._e_key
        with pytest.raises(secagg.SecAggError) as caught:
            device.share_keys(roster)
        assert caught.value.code == code, caught.value

    forged = r.roster(u)
    forged["adverts"][v]["advert"] = {**r.adverts[v], "c_pk": r.adverts[u]["c_pk"]}
    refused(forged, "secagg_bad_signature")
    other_round = secagg.SecAggDevice("round-8", v, Ed25519PrivateKey.generate(), r.params)
    replayed = r.roster(u)
    replayed["adverts"][v]["advert"] = other_round.advertise()  # another round's advert
    refused(replayed, "secagg_bad_signature")
    swapped = r.roster(u)
    swapped["adverts"][v]["identity"] = swapped["adverts"][u]["identity"]
    refused(swapped, "secagg_bad_signature")
    # A validly signed advert with a small-order key (a server relaying one, or a neighbour
    # advertising one): refused as a message, not a ValueError from the key agreement.
    small_order = r.roster(u)
    advert = dict(r.adverts[v])
    advert["e_pk"] = b64(bytes(32))
    advert["sig"] = b64(r.devices[v]._identity.sign(secagg.advert_message(
        ROUND, v, b64decode(advert["c_pk"]), bytes(32), b64decode(advert["b_commit"]))))
    small_order["adverts"][v]["advert"] = advert
    refused(small_order, "secagg_bad_message")
    refused({**r.roster(u), "threshold": 2}, "secagg_unsafe")
    refused({**r.roster(u), "participants": r.u1[:2]}, "secagg_refused")


def test_a_device_refuses_to_reveal_when_too_few_masked_inputs_arrived():
    r = Round(6, 16, min_clients=5)
    r.advertise(r.ids)
    r.share_keys(r.u1)
    r.masked_input(sorted(r.u2))
    with pytest.raises(secagg.SecAggError, match="below min_clients"):
        r.devices[r.ids[0]].unmask({"u3": r.ids[:4]})


def test_a_share_that_does_not_decrypt_is_dropped_not_fatal():
    r = Round(10, 32)
    r.advertise(r.ids)
    r.share_keys(r.u1)
    bad_sender, victim = r.ids[0], r.ids[1]
    ciphertext = bytearray(b64decode(r.shares[bad_sender][victim]))
    ciphertext[-1] ^= 1
    r.shares[bad_sender][victim] = b64(bytes(ciphertext))
    r.masked_input(sorted(r.u2))
    r.unmask(sorted(r.u3))
    assert bad_sender not in r.reveals[victim]["b"]
    expected = sum((r.quantized[u] for u in r.u3), np.zeros(r.length, dtype=np.uint32))
    assert np.array_equal(r.server_sum(), expected)


def test_reveals_are_checked_against_what_the_device_may_say():
    with pytest.raises(secagg.SecAggError, match="not expected"):
        secagg.parse_reveal({"b": {"x" * 32: b64(bytes(secagg.SHARE_BYTES))}, "c": {}}, set(),
                            set())
    with pytest.raises(secagg.SecAggError, match=f"{secagg.SHARE_BYTES} bytes"):
        secagg.parse_reveal({"b": {"a": b64(bytes(10))}, "c": {}}, {"a"}, set())
    with pytest.raises(secagg.SecAggError):
        secagg.parse_reveal({"b": {}}, set(), set())


def test_an_adaptive_rounds_input_ends_with_the_devices_centred_clip_bit():
    """Adaptive clipping: the input is the flattened update (sorted names) and C (b - 1/2),
    b = 1 when the norm before clipping was within C; rounds with a fixed clip send the
    update alone."""
    from device_sdk.model_update import ModelUpdate
    from device_sdk.uploads import flatten_update, secagg_vector

    delta = {"b": np.full(2, 0.1, np.float32), "a": np.full(3, -0.1, np.float32)}
    within = ModelUpdate(1, delta, 5, clip_norm=0.4, norm=0.2236, norm_before_clip=0.2236)
    clipped = ModelUpdate(1, delta, 5, clip_norm=0.4, norm=0.4, norm_before_clip=2.5)
    flat = flatten_update(within)
    assert flat.tolist() == pytest.approx([-0.1] * 3 + [0.1] * 2)
    assert secagg_vector(within, clip_bit=False).tolist() == flat.tolist()
    assert secagg_vector(within, clip_bit=True).tolist() == [*flat.tolist(), 0.2]
    assert secagg_vector(clipped, clip_bit=True).tolist() == [*flat.tolist(), -0.2]
    params = secagg.TaskParams(scale=1024.0, vector_length=6, min_clients=3, clip_bit=True)
    assert secagg.TaskParams.from_json(params.to_json()) == params
    assert "clip_bit" not in secagg.TaskParams(1024.0, 5, 3).to_json()
    with pytest.raises(secagg.SecAggError, match="bad clip_bit"):
        secagg.TaskParams.from_json({**params.to_json(), "clip_bit": 1})
