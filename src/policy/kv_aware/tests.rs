use std::time::Duration;

use super::super::testing::{ids, user_chat as chat, views};
use super::super::Outcome;
use super::*;
use crate::endpoint::EndpointId;
use crate::kv_events::{BlockRemoved, BlockStored, EngineHash, KvEvent};
use crate::request::LlmRequest;
use crate::store::{MemoryStore, TRIP_AFTER};

fn policy(settings: KvAwareSettings) -> (KvAware, Arc<KvIndex>) {
    let counts = Arc::new(PoolCounts::new(Arc::new(MemoryStore::new()), "p"));
    let index = Arc::new(KvIndex::new("p", 1024));
    let p = KvAware::new(counts, index.clone(), Tokenizer::Approximate, settings);
    (p, index)
}

/// A completion whose prompt is given as token ids `0..n` (offset by `salt`).
fn tokens_prompt(n: u32, salt: u32) -> (LlmRequest, Vec<u32>) {
    let tokens: Vec<u32> = (0..n).map(|t| t + salt).collect();
    let body = serde_json::json!({"model": "m", "prompt": tokens});
    (LlmRequest::parse(body.to_string().as_bytes()), tokens)
}

async fn pick(p: &KvAware, request: &LlmRequest, candidates: &[EndpointId]) -> Pick {
    let endpoints = views(&[1; 3]);
    p.pick(PickInput {
        request,
        endpoints: &endpoints,
        candidates,
    })
    .await
    .expect("pick")
}

/// Wait for the spawned releases to have given every unit back.
async fn released(p: &KvAware) {
    for _ in 0..1000 {
        if p.counts.held_total() == 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{} units still held", p.counts.held_total());
}

fn label(i: usize) -> String {
    format!("127.0.0.1:{}", 9000 + i)
}

fn stored(tokens: &[u32], first_hash: u64) -> KvEvent {
    let blocks = tokens.len() / 16;
    KvEvent::BlockStored(BlockStored {
        block_hashes: (0..blocks as u64)
            .map(|h| EngineHash::from(first_hash + h))
            .collect(),
        token_ids: tokens[..blocks * 16].to_vec(),
        block_size: 16,
        ..BlockStored::default()
    })
}

#[tokio::test]
async fn a_conversation_comes_back_to_the_endpoint_that_holds_it() {
    let (p, _) = policy(KvAwareSettings::default());
    let long = "a long shared system prompt, repeated ".repeat(20);
    let first = pick(&p, &chat(&[&long]), &ids(3)).await;
    assert_eq!(first.reason, "kv_miss");
    // The next turn, once the first is answered, is predicted to be cached where it went.
    first.lease.expect("lease").release(Outcome::Completed);
    released(&p).await;
    let second = pick(&p, &chat(&[&long, "and more"]), &ids(3)).await;
    assert_eq!(second.endpoint, first.endpoint);
    assert_eq!(second.reason, "kv_hit");
    // Unrelated prompts go elsewhere: the least loaded.
    let other = pick(
        &p,
        &chat(&["something else entirely, quite long too"]),
        &ids(3),
    )
    .await;
    assert_ne!(other.endpoint, first.endpoint);
    assert_eq!(other.reason, "kv_miss");
    for l in [second.lease, other.lease] {
        l.expect("lease").release(Outcome::Completed);
    }
    released(&p).await;
}

#[tokio::test]
async fn load_in_tokens_outweighs_a_short_cached_prefix() {
    // Only endpoint 0 sends events (so it counts as full): no eviction cost, prefill and load.
    let (p, index) = policy(KvAwareSettings {
        tie_per_mille: 0,
        decode_tokens: 128,
        eviction_per_mille: 0,
        ..KvAwareSettings::default()
    });
    // Endpoint 0's engine holds the first 32 tokens of a 64-token prompt.
    let (request, tokens) = tokens_prompt(64, 0);
    index.apply(&label(0), &[stored(&tokens[..32], 1)]);
    let hit = pick(&p, &request, &ids(3)).await;
    assert_eq!((hit.endpoint, hit.reason), (EndpointId::new(0), "kv_hit"));
    // Endpoint 0 now carries 32 uncached + 128 decode tokens; saving 32 prefill tokens is
    // not worth that much load: the next identical request goes to an idle endpoint.
    let next = pick(&p, &request, &ids(3)).await;
    assert_ne!(next.endpoint, EndpointId::new(0));
    assert_eq!(next.reason, "kv_load");
    // Counted in tokens: (64 - 32) + 128 and 64 + 128.
    assert_eq!(p.counts.held(&label(0)), 160);
    assert_eq!(p.counts.held(&label(next.endpoint.index())), 192);
    // Once the answer starts, the prefill is done: only the decoding stays counted.
    let mut hit_lease = hit.lease.expect("lease");
    hit_lease.first_byte();
    hit_lease.first_byte();
    for _ in 0..1000 {
        if p.counts.held(&label(0)) == 128 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(p.counts.held(&label(0)), 128);
    hit_lease.release(Outcome::Completed);
    next.lease.expect("lease").release(Outcome::Completed);
    released(&p).await;
}

#[tokio::test]
async fn engine_events_decide_and_evictions_are_seen() {
    // No predictions at all: the events alone decide.
    let (p, index) = policy(KvAwareSettings {
        predicted_ttl: Duration::ZERO,
        guess_ttl: Duration::ZERO,
        ..KvAwareSettings::default()
    });
    let (request, tokens) = tokens_prompt(2048, 7);
    // Endpoint 2 holds the whole prompt; a 2048-token prefill outweighs any decode load.
    index.apply(&label(2), &[stored(&tokens, 100)]);
    for _ in 0..3 {
        let chosen = pick(&p, &request, &ids(3)).await;
        assert_eq!(
            (chosen.endpoint, chosen.reason),
            (EndpointId::new(2), "kv_hit")
        );
        chosen.lease.expect("lease").release(Outcome::Completed);
    }
    // The engine evicts its first block: nothing of the chain is cached any more.
    index.apply(
        &label(2),
        &[KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineHash::from(100u64)],
            ..BlockRemoved::default()
        })],
    );
    let after = pick(&p, &request, &ids(3)).await;
    assert_eq!(after.reason, "kv_miss");
    after.lease.expect("lease").release(Outcome::Completed);
    // Only candidates are considered: with endpoint 2 excluded it is a miss too.
    index.apply(&label(2), &[stored(&tokens, 100)]);
    let without = pick(&p, &request, &[EndpointId::new(0), EndpointId::new(1)]).await;
    assert_eq!(without.reason, "kv_miss");
}

#[tokio::test]
async fn without_the_store_it_falls_back_to_local_least_request() {
    let (p, _) = policy(KvAwareSettings::default());
    for _ in 0..TRIP_AFTER {
        p.counts.trip_for_test();
    }
    let chosen = pick(&p, &chat(&["hello"]), &ids(3)).await;
    assert_eq!(chosen.reason, "local_least_request");
    assert!(chosen.lease.is_none());
}

#[tokio::test]
async fn content_an_engine_evicted_stays_where_it_was_placed() {
    // Events are followed for every endpoint (streams that never answer: nothing is held), and
    // predictions end at once: only the routed history remembers where a prompt went.
    let settings = KvAwareSettings {
        predicted_ttl: Duration::ZERO,
        tie_per_mille: 0,
        ..KvAwareSettings::default()
    };
    let (p, index) = policy(settings.clone());
    let _feeds: Vec<_> = (0..3)
        .map(|i| {
            let options = crate::kv_events::SubscriberOptions::default();
            index
                .feeds()
                .follow(&index, &label(i), "tcp://127.0.0.1:9", options)
                .expect("feed")
        })
        .collect();
    let (request, tokens) = tokens_prompt(2048, 3);
    let placed = pick(&p, &request, &[EndpointId::new(1)]).await;
    placed.lease.expect("lease").release(Outcome::Completed);
    released(&p).await;
    // No engine holds the prompt; it goes back where it was placed, at equal load.
    for _ in 0..3 {
        let again = pick(&p, &request, &ids(3)).await;
        assert_eq!(
            (again.endpoint, again.reason),
            (EndpointId::new(1), "kv_miss")
        );
        again.lease.expect("lease").release(Outcome::Completed);
        released(&p).await;
    }
    // What an engine reports holding outweighs what was routed elsewhere.
    index.apply(&label(2), &[stored(&tokens, 500)]);
    let held = pick(&p, &request, &ids(3)).await;
    assert_eq!((held.endpoint, held.reason), (EndpointId::new(2), "kv_hit"));
    held.lease.expect("lease").release(Outcome::Completed);
    released(&p).await;
    // With `routedWeight` 0 the history is not kept.
    let (p, index) = policy(KvAwareSettings {
        routed_per_mille: 0,
        ..settings
    });
    let _feed = index.feeds().follow(
        &index,
        &label(1),
        "tcp://127.0.0.1:9",
        crate::kv_events::SubscriberOptions::default(),
    );
    let placed = pick(&p, &request, &[EndpointId::new(1)]).await;
    placed.lease.expect("lease").release(Outcome::Completed);
    released(&p).await;
    assert_eq!(
        index.matched_routed(&chain_keys(&tokens, 16), &[&label(1)]),
        vec![0]
    );
}

#[tokio::test]
async fn uncached_tokens_cost_more_on_a_full_cache() {
    let settings = KvAwareSettings {
        tie_per_mille: 0,
        ..KvAwareSettings::default()
    };
    let removed = |hash: u64| {
        KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: vec![EngineHash::from(hash)],
            ..BlockRemoved::default()
        })
    };
    let (request, tokens) = tokens_prompt(1536, 0);
    let (filler, _) = tokens_prompt(1000, 50_000);
    for eviction_per_mille in [0, 1000] {
        let (p, index) = policy(KvAwareSettings {
            eviction_per_mille,
            ..settings.clone()
        });
        // Endpoint 0 holds the first 1024 tokens of the prompt, endpoint 1 other content; both
        // have evicted, so their caches are full. Endpoint 2's cache was full and emptied.
        let other = |salt| tokens_prompt(64, salt).1;
        index.apply(&label(0), &[stored(&other(90_000), 900)]);
        index.apply(&label(0), &[stored(&tokens[..1024], 1), removed(900)]);
        index.apply(&label(1), &[stored(&other(80_000), 800), removed(800)]);
        index.apply(&label(1), &[stored(&other(81_000), 810)]);
        index.apply(&label(2), &[stored(&other(70_000), 700), removed(700)]);
        index.apply(&label(2), &[KvEvent::AllBlocksCleared]);
        assert_eq!(
            index
                .matched_and_fullness(&[], &[&label(0), &label(1), &label(2)])
                .1[1],
            1000
        );
        // Endpoint 0 is busy with 1000 uncached prompt tokens and 128 of decoding.
        let busy = pick(&p, &filler, &[EndpointId::new(0)]).await;
        let two = [EndpointId::new(0), EndpointId::new(1)];
        let chosen = pick(&p, &request, &two).await;
        if eviction_per_mille == 0 {
            // 512 uncached + 1128 in flight costs more than 1536 uncached on an idle engine.
            assert_eq!(
                (chosen.endpoint, chosen.reason),
                (EndpointId::new(1), "kv_load")
            );
        } else {
            // On full caches 512 uncached tokens cost about 1024, 1536 cost 3072: the content
            // stays where it is held...
            assert_eq!(
                (chosen.endpoint, chosen.reason),
                (EndpointId::new(0), "kv_hit")
            );
            // ...unless an engine has room: there, 1536 uncached tokens cost their prefill only.
            let roomy = pick(&p, &request, &ids(3)).await;
            assert_eq!(
                (roomy.endpoint, roomy.reason),
                (EndpointId::new(2), "kv_load")
            );
            roomy.lease.expect("lease").release(Outcome::Completed);
        }
        for l in [busy.lease, chosen.lease] {
            l.expect("lease").release(Outcome::Completed);
        }
        released(&p).await;
    }
}

#[tokio::test]
async fn a_copy_costs_its_eviction_before_the_cache_size_is_known() {
    // Both engines send events and neither has evicted yet: their caches count as full, so a
    // copy of what endpoint 0 holds costs what it will evict once they fill.
    let (p, index) = policy(KvAwareSettings {
        tie_per_mille: 0,
        ..KvAwareSettings::default()
    });
    let (request, tokens) = tokens_prompt(1536, 0);
    let (filler, _) = tokens_prompt(1000, 50_000);
    index.apply(&label(0), &[stored(&tokens[..1024], 1)]);
    index.apply(&label(1), &[stored(&tokens_prompt(64, 80_000).1, 800)]);
    // Endpoint 0 is busy with 1000 uncached prompt tokens and 128 of decoding: 512 uncached
    // there cost 1024 + 1128, 1536 on the idle engine 3072. Counted as empty, the copy would
    // cost 1536 against 512 + 1128, and the document would be cached twice.
    let busy = pick(&p, &filler, &[EndpointId::new(0)]).await;
    let chosen = pick(&p, &request, &ids(2)).await;
    assert_eq!(
        (chosen.endpoint, chosen.reason),
        (EndpointId::new(0), "kv_hit")
    );
    for l in [busy.lease, chosen.lease] {
        l.expect("lease").release(Outcome::Completed);
    }
    released(&p).await;
}

#[tokio::test]
async fn an_engine_queue_counts_as_load_when_scraped() {
    let labels = (0..3).map(label).collect();
    let board = Arc::new(MetricsBoard::new("p", labels, Duration::from_secs(60)));
    let waiting = |i: usize, n: u64| {
        let m = crate::scrape::EndpointMetrics {
            waiting: n,
            ..Default::default()
        };
        board.publish(i, m, std::time::Instant::now(), 0);
    };
    let (request, tokens) = tokens_prompt(64, 0);
    for queue_per_mille in [0, 1000] {
        // Only endpoint 0 sends events (so it counts as full): no eviction cost, the queue alone.
        let (p, index) = policy(KvAwareSettings {
            tie_per_mille: 0,
            queue_per_mille,
            eviction_per_mille: 0,
            ..KvAwareSettings::default()
        });
        let p = p.with_board(Some(board.clone()));
        // Endpoint 0 holds half the prompt; its engine reports nothing waiting: it is chosen.
        index.apply(&label(0), &[stored(&tokens[..32], 1)]);
        waiting(0, 0);
        let hit = pick(&p, &request, &ids(3)).await;
        assert_eq!((hit.endpoint, hit.reason), (EndpointId::new(0), "kv_hit"));
        hit.lease.expect("lease").release(Outcome::Completed);
        released(&p).await;
        // Its engine then reports a request waiting that llm-lb did not send (its own count is
        // zero): counted like one more request such as this one (160 tokens at endpoint 0), it
        // outweighs the 32 cached tokens.
        waiting(0, 1);
        let chosen = pick(&p, &request, &ids(3)).await;
        if queue_per_mille == 0 {
            assert_eq!(
                (chosen.endpoint, chosen.reason),
                (EndpointId::new(0), "kv_hit")
            );
        } else {
            assert_ne!(chosen.endpoint, EndpointId::new(0));
            assert_eq!(chosen.reason, "kv_load");
        }
        chosen.lease.expect("lease").release(Outcome::Completed);
        released(&p).await;
    }
}

#[tokio::test]
async fn new_content_goes_where_fewest_requests_are_in_flight() {
    let (p, index) = policy(KvAwareSettings {
        tie_per_mille: 0,
        ..KvAwareSettings::default()
    });
    // Endpoint 0 is prefilling one long prompt (its view is not counted here: 0 requests);
    // endpoints 1 and 2 each run one request, in no token count.
    let (long, _) = tokens_prompt(2048, 90_000);
    let prefilling = pick(&p, &long, &[EndpointId::new(0)]).await;
    let endpoints = views(&[1; 3]);
    endpoints[1].add_inflight(1);
    endpoints[2].add_inflight(1);
    let place = |request: LlmRequest| {
        let (p, endpoints) = (&p, &endpoints);
        async move {
            let candidates = ids(3);
            p.pick(PickInput {
                request: &request,
                endpoints,
                candidates: &candidates,
            })
            .await
            .expect("pick")
        }
    };
    // A new prompt goes to endpoint 0, whatever its tokens in flight.
    let (fresh, _) = tokens_prompt(256, 0);
    let new = place(fresh).await;
    assert_eq!((new.endpoint, new.reason), (EndpointId::new(0), "kv_miss"));
    // A prompt endpoint 2 holds is not new: the cost decides, and it goes there.
    let (held, tokens) = tokens_prompt(256, 5_000);
    index.apply(&label(2), &[stored(&tokens, 1)]);
    let hit = place(held).await;
    assert_eq!((hit.endpoint, hit.reason), (EndpointId::new(2), "kv_hit"));
    for l in [prefilling.lease, new.lease, hit.lease] {
        l.expect("lease").release(Outcome::Completed);
    }
    released(&p).await;
}
