//! Operations that finish when their caller stops waiting.
//!
//! A lock, an update-and-unlock or a whole write changes state at several members,
//! and the client's heartbeats keep that state alive for as long as the [`Client`]
//! lives. If its future were simply dropped half-way (a caller's timeout, a
//! `select!`), a lock granted by some members would stay held, and an update sent to
//! some would never be followed by its unlock. So each of these runs as a [`Finish`]:
//! the caller polls it as usual; dropped before it is done, what is left of it is
//! handed to a task of its own on the same runtime, which runs it to the end and
//! then releases the locks nobody will use (a lock's outcome).
//!
//! An operation handed over is *given up*, and kept in a [`GivenUp`] until it has
//! ended. What must come after it waits for it first:
//! - a lock of the same stripe and owner (an owner may lock a stripe again: a cache
//!   locks under one owner): the given-up step's unlocks are then queued
//!   (`backlog`), so they reach each member before that lock, and cannot release it;
//! - a write (`Client::write`, `write_blocks`, `write_stripe`) of the same stripe: a
//!   write given up on lands before the next one, as a write whose answer was lost
//!   would have;
//! - a write-back cache's next operation on blocks (`cache`).
//!
//! The order holds for a future dropped by its caller (a timeout, `select!`) before
//! the caller goes on; a task aborted from elsewhere is dropped later, when the
//! runtime gets to it. An operation whose own poll panicked is not handed over. One
//! dropped outside the runtime (on a thread of its own, say), or while the runtime
//! shuts down, ends there; the client's lease then runs out once the client is
//! dropped.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use drs_proto::{ClientId, StripeId};
use futures::future::{BoxFuture, FutureExt, Shared};

use crate::Client;

/// What a client orders after operations given up on: the locks of one owner in a
/// stripe, or the writes of a stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Owner(StripeId, ClientId),
    Writes(StripeId),
}

/// One operation given up on: set `done` when its task ended, `wait` to wait for it.
#[derive(Clone)]
pub(crate) struct Ended {
    done: Arc<AtomicBool>,
    wait: Shared<BoxFuture<'static, ()>>,
}

/// Sets its flag when dropped: at the end of a task, even one that panicked.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Operations given up on and still running, by what must wait for them.
pub(crate) struct GivenUp<K> {
    running: Mutex<HashMap<K, Vec<Ended>>>,
}

impl<K> Default for GivenUp<K> {
    fn default() -> Self {
        GivenUp {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Copy + Send + 'static> GivenUp<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Vec<Ended>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add(&self, key: K, ended: Ended) {
        let mut running = self.lock();
        running.retain(|_, v| {
            v.retain(|e| !e.done.load(Ordering::Acquire));
            !v.is_empty()
        });
        running.entry(key).or_default().push(ended);
    }

    /// Operations of `key` still running.
    #[cfg(test)]
    pub(crate) fn running(&self, key: K) -> usize {
        self.lock().get(&key).map_or(0, |v| {
            v.iter().filter(|e| !e.done.load(Ordering::Acquire)).count()
        })
    }

    /// Waits until every operation of `key` given up on so far has ended. (Each
    /// is bounded by the client's own timeouts.)
    pub(crate) async fn wait(&self, key: K) {
        let pending: Vec<Ended> = {
            let mut running = self.lock();
            let Some(v) = running.get_mut(&key) else {
                return;
            };
            v.retain(|e| !e.done.load(Ordering::Acquire));
            if v.is_empty() {
                running.remove(&key);
                return;
            }
            v.clone()
        };
        futures::future::join_all(pending.into_iter().map(|e| e.wait)).await;
    }
}

/// What is done with the outcome of an operation whose caller left.
pub(crate) type Leftover<O> = fn(Client, O) -> BoxFuture<'static, ()>;

/// Where an operation handed over is kept while it runs.
pub(crate) type OnGivenUp = Box<dyn FnOnce(Ended) + Send>;

/// Where an operation of `key` handed over is kept.
pub(crate) fn keep_in<K>(given_up: &Arc<GivenUp<K>>, key: K) -> OnGivenUp
where
    K: Eq + Hash + Copy + Send + Sync + 'static,
{
    let given_up = given_up.clone();
    Box::new(move |e| given_up.add(key, e))
}

/// Runs `op` to its end even if the caller stops waiting (then `leftover` gets its
/// outcome), kept in `given_up` under `key` meanwhile; first waits for those of
/// `key` given up before.
pub(crate) async fn ordered<K, O>(
    client: &Client,
    given_up: &Arc<GivenUp<K>>,
    key: K,
    op: impl Future<Output = O> + Send + 'static,
    leftover: Option<Leftover<O>>,
) -> O
where
    K: Eq + Hash + Copy + Send + Sync + 'static,
    O: Send + 'static,
{
    given_up.wait(key).await;
    Finish::new(client, Box::pin(op), leftover, Some(keep_in(given_up, key)))
        .run()
        .await
}

/// Runs `op` to its end even if the caller stops waiting; nothing waits for it.
pub(crate) async fn to_end<O: Send + 'static>(
    client: &Client,
    op: impl Future<Output = O> + Send + 'static,
) -> O {
    Finish::new(client, Box::pin(op), None, None).run().await
}

/// An operation that runs to its end even if its caller stops waiting (module docs).
pub(crate) struct Finish<O: Send + 'static> {
    work: BoxFuture<'static, O>,
    done: bool,
    /// In a poll of `work` (still set when dropped: the poll panicked).
    polling: bool,
    client: Client,
    leftover: Option<Leftover<O>>,
    on_given_up: Option<OnGivenUp>,
}

impl<O: Send + 'static> Finish<O> {
    pub(crate) fn new(
        client: &Client,
        work: BoxFuture<'static, O>,
        leftover: Option<Leftover<O>>,
        on_given_up: Option<OnGivenUp>,
    ) -> Finish<O> {
        Finish {
            work,
            done: false,
            polling: false,
            client: client.clone(),
            leftover,
            on_given_up,
        }
    }

    /// Runs the operation here, as long as the caller waits.
    pub(crate) async fn run(mut self) -> O {
        let out = std::future::poll_fn(|cx| {
            // Left set if the poll panics: the operation cannot be resumed.
            self.polling = true;
            let out = self.work.as_mut().poll(cx);
            self.polling = false;
            out
        })
        .await;
        self.done = true;
        out
    }
}

impl<O: Send + 'static> Drop for Finish<O> {
    fn drop(&mut self) {
        // A panic of the operation itself unwound through here: nothing to resume.
        if self.done || self.polling {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let work = std::mem::replace(&mut self.work, Box::pin(futures::future::pending()));
        let client = self.client.clone();
        let leftover = self.leftover;
        let done = Arc::new(AtomicBool::new(false));
        let set = SetOnDrop(done.clone());
        let rest = rt.spawn(async move {
            let _set = set;
            let out = work.await;
            if let Some(leftover) = leftover {
                leftover(client, out).await;
            }
        });
        if let Some(on) = self.on_given_up.take() {
            let wait: BoxFuture<'static, ()> = Box::pin(rest.map(|_| ()));
            on(Ended {
                done,
                wait: wait.shared(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use super::Key;
    use crate::fakenode::{self, lock, FakeNode};
    use crate::write::BlockWrite;
    use crate::{Client, ClientConfig};

    /// A client whose requests to a silent node time out after a second.
    fn client(map: drs_proto::ClusterMap) -> Client {
        let cfg = ClientConfig {
            request_timeout: Duration::from_secs(1),
            ..ClientConfig::default()
        };
        Client::new(map, 1, cfg).unwrap()
    }

    /// Owners holding block 0 of stripe 0, by position.
    fn holders(fakes: &[FakeNode]) -> Vec<Option<u64>> {
        fakes
            .iter()
            .map(|f| lock(&f.table).get(&(0, 0)).copied())
            .collect()
    }

    /// Three fake nodes (2 enough for a write), a client, and the position of the
    /// member of stripe 0 that answers nothing.
    async fn with_a_silent_member() -> (Client, Vec<FakeNode>, usize) {
        let (map, fakes) = fakenode::cluster_with(false, 2).await;
        let c = client(map);
        let silent = c.geometry().member(0, 2) as usize;
        fakes[silent].silent.store(true, Ordering::Relaxed);
        (c, fakes, silent)
    }

    /// Polls `op` until `ready` (checked every 20 ms, for up to 5 s), then drops it,
    /// as a caller's timeout would.
    async fn give_up<F: std::future::Future>(op: F, ready: impl Fn() -> bool) {
        let mut op = std::pin::pin!(op);
        let until = Instant::now() + Duration::from_secs(5);
        while !ready() {
            assert!(Instant::now() < until, "not ready to be given up on");
            tokio::select! {
                _ = &mut op => panic!("the operation ended before it was given up on"),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// `n` positions hold block 0 for `owner`.
    fn granted(fakes: &[FakeNode], owner: Option<u64>, n: usize) -> bool {
        holders(fakes)
            .iter()
            .filter(|h| owner.map_or(h.is_some(), |o| **h == Some(o)))
            .count()
            == n
    }

    /// `owner` locks block 0 again at every member, still holds it past the given-up
    /// step's timeout, its release and the backlog's rounds, and lets it go.
    async fn locks_again(c: &Client, fakes: &[FakeNode], owner: u64) {
        let locked = c.lock_stripe(0, &[(0, 0, 0)], owner).await.unwrap();
        assert_eq!(locked.live(), 3);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(holders(fakes), vec![Some(owner); 3]);
        c.unlock_stripe(&locked).await;
        assert_eq!(until_free(fakes).await, vec![None; 3]);
    }

    async fn until_free(fakes: &[FakeNode]) -> Vec<Option<u64>> {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if holders(fakes).iter().all(|h| h.is_none()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        holders(fakes)
    }

    #[tokio::test]
    async fn a_lock_dropped_half_way_is_released() {
        // Position 2 answers nothing: the lock waits for it, and the caller gives up
        // first, when positions 0 and 1 have granted.
        let (c, fakes, _) = with_a_silent_member().await;
        let owner = 0x21;
        let lock_it = c.lock_stripe(0, &[(0, 0, 0)], owner);
        give_up(lock_it, || granted(&fakes, Some(owner), 2)).await;
        // The lock ends in the background (position 2 times out, 2 members are
        // enough) and nobody takes it: it is released.
        assert_eq!(until_free(&fakes).await, vec![None; 3]);
    }

    #[tokio::test]
    async fn the_same_owner_locks_again_after_giving_up_on_a_lock() {
        // The abandoned lock ends after the new one was asked for: its release must
        // not release the new lock.
        let (c, fakes, silent) = with_a_silent_member().await;
        let owner = 0x22;
        let first = c.lock_stripe(0, &[(0, 0, 0)], owner);
        give_up(first, || granted(&fakes, Some(owner), 2)).await;
        fakes[silent].silent.store(false, Ordering::Relaxed);
        locks_again(&c, &fakes, owner).await;
    }

    #[tokio::test]
    async fn the_same_owner_locks_again_after_giving_up_on_a_commit() {
        // The commit's part for position 2 gets no answer; the caller gives up and
        // locks again. The commit's unlock for position 2, left to the backlog when
        // it times out, must reach it before the new lock does.
        let (map, fakes) = fakenode::cluster_with(false, 2).await;
        let c = client(map);
        let owner = 0x23;
        let locked = c.lock_stripe(0, &[(0, 0, 0)], owner).await.unwrap();
        assert_eq!(locked.live(), 3);
        let silent = c.geometry().member(0, 2) as usize;
        fakes[silent].silent.store(true, Ordering::Relaxed);
        let delta = Bytes::from(vec![1u8; 16]);
        let commit = c.commit_stripe(&locked, vec![(0, 0, delta)]);
        // Positions 0 and 1 took the update and unlock; position 2 answers nothing.
        give_up(commit, || granted(&fakes, Some(owner), 1)).await;
        fakes[silent].silent.store(false, Ordering::Relaxed);
        locks_again(&c, &fakes, owner).await;
    }

    #[tokio::test]
    async fn a_write_dropped_half_way_runs_to_its_end() {
        let (c, fakes, _) = with_a_silent_member().await;
        let write = c.write_stripe(
            0,
            vec![BlockWrite {
                index: 0,
                offset: 0,
                data: Bytes::from(vec![7u8; 16]),
            }],
        );
        give_up(write, || granted(&fakes, None, 2)).await;
        // Locked at 2 members, then updated and unlocked there: done, with nothing
        // left held.
        assert_eq!(until_free(&fakes).await, vec![None; 3]);
        let until = Instant::now() + Duration::from_secs(5);
        while c.stats().writes.load(Ordering::Relaxed) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(c.stats().writes.load(Ordering::Relaxed), 1);
    }

    fn write_of(index: usize, byte: u8) -> Vec<BlockWrite> {
        vec![BlockWrite {
            index,
            offset: 0,
            data: Bytes::from(vec![byte; 16]),
        }]
    }

    #[tokio::test]
    async fn a_write_given_up_on_lands_before_the_next_write_of_its_stripe() {
        // The second write is to the other block of the stripe: no lock of the
        // first one holds it up. It still comes after the first, as after a write
        // whose answer was lost.
        let (c, fakes, silent) = with_a_silent_member().await;
        let first = c.write_stripe(0, write_of(0, 7));
        give_up(first, || granted(&fakes, None, 2)).await;
        assert_eq!(c.inner.given_up.running(Key::Writes(0)), 1);
        fakes[silent].silent.store(false, Ordering::Relaxed);
        c.write_stripe(0, write_of(1, 8)).await.unwrap();
        assert_eq!(c.inner.given_up.running(Key::Writes(0)), 0);
        assert_eq!(c.stats().writes.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_cache_write_given_up_on_comes_before_the_next_flush() {
        // Another client holds block 0: the cache's write waits for it, without
        // the cache's map (other operations go on meanwhile), and is given up on.
        // Without the order, the flush would find the cache empty and return, and
        // the write would then leave the block cached and locked behind it.
        let (map, fakes) = fakenode::cluster_with(false, 2).await;
        let c = client(map.clone());
        let cache = crate::WriteBackCache::new(c.clone(), 16);
        let other = client(map);
        let held = other.lock_stripe(0, &[(0, 0, 0)], 0x77).await.unwrap();
        let write = cache.write(0, 0, &[9u8; 16]);
        // Waiting for the block (a retry counted), without the cache's map.
        give_up(write, || c.stats().lock_retries.load(Ordering::Relaxed) > 0).await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            other.unlock_stripe(&held).await;
        });
        cache.flush().await.unwrap();
        // Past the moment the write got the block.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(cache.len().await, 0, "a block was cached after the flush");
        assert_eq!(until_free(&fakes).await, vec![None; 3]);
    }

    #[tokio::test]
    async fn an_operation_that_panicked_is_not_resumed() {
        let (map, _fakes) = fakenode::cluster_with(false, 2).await;
        let c = client(map);
        let given_up = std::sync::Arc::new(super::GivenUp::default());
        let key = Key::Writes(0);
        let op = super::ordered(&c, &given_up, key, async { panic!("a bug") }, None);
        let out = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(op)).await;
        assert!(out.is_err());
        // Handed over, it would panic again in its task ("resumed after panicking").
        assert_eq!(given_up.running(key), 0);
    }
}
