//! Which endpoints' event streams a pool follows, across configuration generations.
//!
//! A [`Feed`] is one running [`KvEventsSubscriber`]: it runs while any generation holds it and
//! stops (forgetting what its endpoint held) when the last one lets go. [`Feeds::follow`] hands a
//! new generation the feed already running for the same endpoint and stream, so a reload or a
//! DNS refresh neither interrupts a stream nor clears what it taught the index.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::index::KvIndex;
use super::subscriber::{KvEventsSubscriber, SubscriberOptions};

/// One endpoint's stream, followed into its pool's index while this is alive.
pub struct Feed {
    index: Arc<KvIndex>,
    endpoint: String,
    stop: watch::Sender<bool>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Nobody follows the endpoint's stream any more: what it said can no longer be trusted.
        self.index.forget_endpoint(&self.endpoint);
    }
}

type FeedKey = (String, String, Option<String>, String);

/// The feeds running into one pool's index.
#[derive(Default)]
pub struct Feeds {
    /// By (endpoint, stream, replay socket, topic).
    running: Mutex<HashMap<FeedKey, Weak<Feed>>>,
}

impl Feeds {
    /// Whether a feed of `endpoint`'s stream is running.
    pub fn follows(&self, endpoint: &str) -> bool {
        self.running
            .lock()
            .iter()
            .any(|((e, ..), feed)| e == endpoint && feed.strong_count() > 0)
    }

    /// The feed of `endpoint`'s stream at `url` into `index` (with these options): the running one,
    /// or a new
    /// subscriber started on the current Tokio runtime (`None` outside one).
    pub fn follow(
        &self,
        index: &Arc<KvIndex>,
        endpoint: &str,
        url: &str,
        options: SubscriberOptions,
    ) -> Option<Arc<Feed>> {
        let key = (
            endpoint.to_owned(),
            url.to_owned(),
            options.replay.clone(),
            options.topic.clone(),
        );
        let mut running = self.running.lock();
        running.retain(|_, feed| feed.strong_count() > 0);
        if let Some(feed) = running.get(&key).and_then(Weak::upgrade) {
            return Some(feed);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (stop, stopped) = watch::channel(false);
        let subscriber = KvEventsSubscriber::new(index.clone(), endpoint, url, options);
        runtime.spawn(subscriber.run(stopped));
        let feed = Arc::new(Feed {
            index: index.clone(),
            endpoint: endpoint.to_owned(),
            stop,
        });
        running.insert(key, Arc::downgrade(&feed));
        Some(feed)
    }
}
