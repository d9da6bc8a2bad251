"""A seeded synthetic e-commerce event log with learnable structure.

The world: items have a Zipf-like popularity and one latent topic each; every user likes 1-3
topics. A user's sessions are spread over ``days`` days; each session follows one of the user's
topics (items drawn by popularity within it), with a small chance per view of a random popular
item instead. Every view can lead to an add_to_cart (and that to a purchase) of the same item
seconds to minutes later, or to a dismiss. Knowing a user's history therefore predicts the next
items far better than global popularity does, which is what the models must learn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trainer.data.interactions import canonical

# 2024-01-01 00:00:00 UTC; a fixed start keeps the output identical across runs.
DEFAULT_START = 1_704_067_200


def generate(
    n_users: int = 2000,
    n_items: int = 1000,
    seed: int = 0,
    *,
    n_topics: int = 20,
    mean_sessions: float = 6.0,
    mean_session_views: float = 4.0,
    zipf_exponent: float = 0.8,
    p_explore: float = 0.1,
    p_cart: float = 0.3,
    p_purchase: float = 0.5,
    p_dismiss: float = 0.03,
    days: float = 90.0,
    start: int = DEFAULT_START,
) -> pd.DataFrame:
    """Simulate an interaction log and return it as the canonical table.

    Users are ``u0000``.., items ``SKU00000``..; timestamps are Unix seconds in
    ``[start, start + days * 86400)`` plus the in-session offsets (seconds to minutes).
    ``mean_sessions`` and ``mean_session_views`` are per-user and per-session means
    (each at least 1). ``p_cart`` is P(add_to_cart | view), ``p_purchase`` is
    P(purchase | add_to_cart), ``p_dismiss`` is P(dismiss | view not carted), ``p_explore`` is
    the chance a view is a random popular item rather than one from the session's topic.
    The same arguments always give the same table.
    """
    if n_users < 1 or n_items < 1:
        raise ValueError(f"need n_users >= 1 and n_items >= 1, got {n_users}, {n_items}")
    if not 1 <= n_topics <= n_items:
        raise ValueError(f"need 1 <= n_topics <= n_items, got n_topics={n_topics}")
    if mean_sessions < 1 or mean_session_views < 1:
        raise ValueError("mean_sessions and mean_session_views must be >= 1")
    for name, p in [
        ("p_explore", p_explore),
        ("p_cart", p_cart),
        ("p_purchase", p_purchase),
        ("p_dismiss", p_dismiss),
    ]:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    rng = np.random.default_rng(seed)

    # Catalogue: popularity rank independent of topic; topics of (nearly) equal size.
    popularity = 1.0 / np.arange(1, n_items + 1) ** zipf_exponent
    popularity = popularity[rng.permutation(n_items)]
    popularity /= popularity.sum()
    item_topic = rng.permutation(n_items) % n_topics

    # Items grouped by topic, with a cumulative within-topic distribution shifted by the topic
    # number (topic t spans (t, t + 1]), so searchsorted(t + u) samples topic t's items for a
    # whole vector of views at once.
    by_topic = np.argsort(item_topic, kind="stable")
    topic_size = np.bincount(item_topic, minlength=n_topics)
    topic_mass = np.bincount(item_topic, weights=popularity, minlength=n_topics)
    mass_before = np.repeat(np.cumsum(topic_mass) - topic_mass, topic_size)
    topic_sorted = item_topic[by_topic]
    topic_cdf = (
        topic_sorted + (np.cumsum(popularity[by_topic]) - mass_before) / topic_mass[topic_sorted]
    )
    # Exact topic ends, so rounding never spills a draw into the next topic.
    topic_cdf[np.cumsum(topic_size) - 1] = np.arange(1, n_topics + 1)
    global_cdf = np.cumsum(popularity)
    global_cdf[-1] = 1.0

    # Tastes: 1-3 topics per user, drawn without replacement (Gumbel top-k) leaning towards
    # topics with popular items, with Dirichlet(1) weights.
    n_tastes = rng.choice([1, 2, 3], size=n_users, p=[0.3, 0.45, 0.25])
    topic_pref = np.log(np.sqrt(topic_mass))
    keys = topic_pref + rng.gumbel(size=(n_users, n_topics))
    tastes = np.argsort(-keys, axis=1)[:, :3]
    taste_weight = rng.gamma(1.0, size=(n_users, 3)) * (np.arange(3) < n_tastes[:, None])
    taste_cdf = np.cumsum(taste_weight / taste_weight.sum(axis=1, keepdims=True), axis=1)

    # Sessions: start times uniform over the window; each session sticks to one taste topic.
    n_sessions = 1 + rng.poisson(mean_sessions - 1.0, size=n_users)
    session_user = np.repeat(np.arange(n_users), n_sessions)
    n_total_sessions = len(session_user)
    session_start = start + rng.integers(0, int(days * 86400), size=n_total_sessions)
    pick = (rng.random(n_total_sessions)[:, None] > taste_cdf[session_user]).sum(axis=1)
    session_topic = tastes[session_user, np.minimum(pick, 2)]

    # Views: seconds to minutes apart inside a session.
    n_views = 1 + rng.poisson(mean_session_views - 1.0, size=n_total_sessions)
    view_session = np.repeat(np.arange(n_total_sessions), n_views)
    n_total_views = len(view_session)
    gaps = 1 + rng.exponential(60.0, size=n_total_views).astype(np.int64)
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[np.cumsum(n_views) - n_views], n_views)
    view_time = session_start[view_session] + elapsed

    explore = rng.random(n_total_views) < p_explore
    u = rng.random(n_total_views)
    on_topic = by_topic[np.searchsorted(topic_cdf, session_topic[view_session] + u, side="right")]
    random_item = np.searchsorted(global_cdf, u, side="right")
    view_item = np.where(explore, random_item, on_topic)
    view_user = session_user[view_session]

    # Funnel: cart a few seconds to minutes after the view, purchase after the cart.
    carted = rng.random(n_total_views) < p_cart
    bought = carted & (rng.random(n_total_views) < p_purchase)
    dismissed = ~carted & (rng.random(n_total_views) < p_dismiss)
    cart_time = view_time + 5 + rng.exponential(90.0, size=n_total_views).astype(np.int64)
    buy_time = cart_time + 10 + rng.exponential(180.0, size=n_total_views).astype(np.int64)
    dismiss_time = view_time + 1 + rng.exponential(10.0, size=n_total_views).astype(np.int64)

    parts = [
        (np.ones(n_total_views, bool), view_time, 0),
        (carted, cart_time, 1),
        (bought, buy_time, 2),
        (dismissed, dismiss_time, 3),
    ]
    kinds = np.array(["view", "add_to_cart", "purchase", "dismiss"])
    user_idx = np.concatenate([view_user[m] for m, _, _ in parts])
    item_idx = np.concatenate([view_item[m] for m, _, _ in parts])
    timestamp = np.concatenate([t[m] for m, t, _ in parts])
    kind = np.concatenate([np.full(int(m.sum()), k) for m, _, k in parts])

    user_names = np.array([f"u{i:0{max(4, len(str(n_users - 1)))}d}" for i in range(n_users)])
    item_names = np.array([f"SKU{i:0{max(5, len(str(n_items - 1)))}d}" for i in range(n_items)])
    # Pre-sorted by (user, time, funnel step): canonical()'s stable sort then keeps ties fixed.
    order = np.lexsort((kind, timestamp, user_idx))
    df = pd.DataFrame(
        {
            "user": user_names[user_idx[order]],
            "item": item_names[item_idx[order]],
            "timestamp": timestamp[order],
            "event": kinds[kind[order]],
        }
    )
    return canonical(df)
