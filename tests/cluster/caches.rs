//! Write-back caches and the client-client interface (report 5.3.1, 5.5): a block
//! held in one client's cache is read and written by others through that cache, and
//! a writer waiting for it gets it by asking the holder to let go. (Cache groups,
//! which need the client process to die, are tested with SIGKILL in the drs-cli
//! tests.)

use std::time::Duration;

use drs_client::cache::CacheConfig;
use drs_client::{ClientConfig, ClientError, WriteBackCache};

use crate::common::{bytes, client_config, read_ok, TestCluster, BS};

/// A cache serving other clients, over a client of its own.
async fn serving_cache(tc: &TestCluster) -> WriteBackCache {
    let cfg = CacheConfig {
        serve: true,
        ..CacheConfig::default()
    };
    WriteBackCache::with_config(tc.new_client(client_config()), cfg)
        .await
        .unwrap()
}

/// Two serving caches: A holds block 5, and B's change to it went into A's cache.
async fn b_wrote_through_a(tc: &TestCluster) -> (WriteBackCache, WriteBackCache) {
    let a = serving_cache(tc).await;
    let b = serving_cache(tc).await;
    a.write(5, 0, &bytes(1, BS)).await.unwrap();
    b.write(5, 100, &bytes(2, 200)).await.unwrap();
    assert_eq!(b.len().await, 0, "B's write went into A's cache");
    (a, b)
}

/// `res` failed with `ForwardedLost` for block 5, saying `why`.
fn assert_forwarded_lost(res: Result<(), ClientError>, why: &str, what: &str) {
    match res {
        Err(ClientError::ForwardedLost { lba: 5, detail, .. }) => {
            assert!(detail.contains(why), "{what}: {detail}")
        }
        other => panic!("{what}: {other:?}"),
    }
}

/// Block 5 reads as `bytes(base, BS)` with `bytes(patch, len)` at `at` (A's write
/// and B's write through A).
async fn assert_block_5(
    tc: &TestCluster,
    (base, at, patch, len): (u64, usize, u64, usize),
    what: &str,
) {
    let mut want = bytes(base, BS);
    want[at..at + len].copy_from_slice(&bytes(patch, len));
    assert_eq!(&read_ok(&tc.client, 5, what).await[..], &want[..], "{what}");
}

async fn locks_held(tc: &TestCluster) -> usize {
    tc.client.status().await.locks.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_block_is_read_and_written_through_its_holder() {
    let tc = TestCluster::start("peer-rw").await;
    let a = serving_cache(&tc).await;
    let b = serving_cache(&tc).await;
    assert!(a.contact().is_some() && b.contact().is_some());
    let (first, second) = (bytes(1, BS), bytes(2, BS));

    a.write(5, 0, &first).await.unwrap();
    assert!(
        read_ok(&tc.client, 5, "before any flush")
            .await
            .iter()
            .all(|x| *x == 0),
        "the cached write is not on the volume yet"
    );
    assert_eq!(
        &b.read_latest(5, 0, BS).await.unwrap()[..],
        &first[..],
        "B reads A's cached bytes through A"
    );

    // B writes the block A holds: the write goes into A's cache.
    b.write(5, 100, &second[..200]).await.unwrap();
    let mut want = first.clone();
    want[100..300].copy_from_slice(&second[..200]);
    assert_eq!(b.len().await, 0, "B did not take the block");
    assert_eq!(
        &a.read(5, 0, BS).await.unwrap()[..],
        &want[..],
        "A's cache holds B's write"
    );
    assert_eq!(&b.read_latest(5, 0, BS).await.unwrap()[..], &want[..]);

    // B's flush asks A to write the block back and let it go.
    b.flush().await.unwrap();
    assert_eq!(a.len().await, 0, "A let the block go");
    assert_eq!(
        &read_ok(&tc.client, 5, "after B's flush").await[..],
        &want[..]
    );
    assert_eq!(locks_held(&tc).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_writer_gets_a_cached_block_from_its_holder() {
    let tc = TestCluster::start("peer-release").await;
    let a = serving_cache(&tc).await;
    let cached = bytes(3, BS);
    a.write(9, 0, &cached).await.unwrap();
    // A plain writer that would give up long before A flushed by itself (it never
    // does here): it succeeds only because A writes the block back when asked.
    let plain = tc.new_client(ClientConfig {
        lock_timeout: Duration::from_secs(3),
        ..client_config()
    });
    let theirs = bytes(4, BS);
    plain.write(9, 0, &theirs[..BS / 2]).await.unwrap();
    assert_eq!(a.len().await, 0, "A let the block go");
    let mut want = cached.clone();
    want[..BS / 2].copy_from_slice(&theirs[..BS / 2]);
    assert_eq!(
        &read_ok(&tc.client, 9, "after the plain write").await[..],
        &want[..],
        "A's cached write went to the volume before the plain one"
    );
    plain.settle_unlocks(Duration::from_secs(5)).await;
    assert_eq!(locks_held(&tc).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_write_through_the_holder_is_on_the_nodes_when_it_returns() {
    let tc = TestCluster::start("peer-durable").await;
    let a = serving_cache(&tc).await;
    let b = serving_cache(&tc).await;
    let cached = bytes(6, BS);
    a.write(6, 0, &cached).await.unwrap();
    let patch = bytes(7, 300);
    b.write_durable(6, 1000, &patch).await.unwrap();
    let mut want = cached.clone();
    want[1000..1300].copy_from_slice(&patch);
    // On the nodes, with A's own cached change, as soon as the call returned.
    assert_eq!(
        &read_ok(&tc.client, 6, "after the durable write").await[..],
        &want[..]
    );
    assert_eq!(a.len().await, 0, "A wrote the block back to answer");
    assert_eq!(b.len().await, 0);
    assert_eq!(locks_held(&tc).await, 0);
    // A block nobody caches: written directly.
    b.write_durable(8, 0, &patch).await.unwrap();
    assert_eq!(&read_ok(&tc.client, 8, "direct").await[..300], &patch[..]);
}

/// B writes through A's cache; A then dies (its cache, and B's change in it, die
/// with it): B's flush must fail, not report the change as on the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_fails_when_the_holder_of_a_forwarded_write_is_gone() {
    let tc = TestCluster::start("peer-gone").await;
    let (a, b) = b_wrote_through_a(&tc).await;
    drop(a);
    assert_forwarded_lost(b.flush().await, "", "B's flush after A died");
}

/// B writes through A's cache; A writes the block back by itself (its own flush)
/// and then goes away: B's change is on the nodes, and B's flush says so. A told B
/// when its write-back carried the change; before, B asked A at its flush, found
/// nobody, and reported the change lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_succeeds_when_the_holder_wrote_back_and_left() {
    let tc = TestCluster::start("peer-left").await;
    let (a, b) = b_wrote_through_a(&tc).await;
    a.flush().await.unwrap();
    drop(a);
    b.flush()
        .await
        .expect("a change its holder wrote back before it left");
    assert_block_5(&tc, (1, 100, 2, 200), "after B's flush").await;
}

/// B writes through A's cache, and A drops its copy of the block (a failed
/// write-back); A takes the block again, B writes through it again, and A writes
/// that copy back. A tells B that its second change is on the nodes, and not the
/// first: B's flush still fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_for_a_later_copy_does_not_cover_a_lost_change() {
    let tc = TestCluster::start("peer-later-copy").await;
    let (a, b) = b_wrote_through_a(&tc).await;
    a.discard_blocks(&[5]).await;
    a.write(5, 0, &bytes(3, BS)).await.unwrap();
    b.write(5, 0, &bytes(4, 100)).await.unwrap();
    assert_eq!(b.len().await, 0, "B's writes went into A's cache");
    a.flush().await.unwrap();
    assert_forwarded_lost(
        b.flush().await,
        "write-back",
        "B's flush after its first change was dropped",
    );
}

/// B writes through A's cache; A dies, and a new cache takes A's address before B
/// flushes. The newcomer never held B's change, and must not answer for it: tickets
/// name the holder's instance, and B's flush fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cache_at_a_dead_holders_address_does_not_answer_for_it() {
    let tc = TestCluster::start("peer-instance").await;
    let (a, b) = b_wrote_through_a(&tc).await;
    let at = a.contact().expect("A serves");
    drop(a);
    // A stops serving when dropped; its port is free a moment later.
    let cfg = CacheConfig {
        serve: true,
        serve_on: at,
        ..CacheConfig::default()
    };
    let mut tries = 0;
    let newcomer = loop {
        match WriteBackCache::with_config(tc.new_client(client_config()), cfg.clone()).await {
            Ok(c) => break c,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("{at} not free yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot listen at A's address {at}: {e}"),
        }
    };
    assert_eq!(newcomer.contact(), Some(at));
    // B's connection to A was closed by A; give B a moment to see that, or its flush
    // may go out on that connection, be reset, and never reach the newcomer (a loss
    // as well, but not the one this test is about). No call of B's shows when it did.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The newcomer answered, and refused to speak for A.
    assert_forwarded_lost(
        b.flush().await,
        "another one listens here",
        "B's flush with a newcomer at A's address",
    );
}

/// B writes through A's cache; A's caller stops waiting for A's flush while its
/// write-back waits for a hung member (a caller's timeout): the flush still runs to
/// its end, and tells B its change is on the nodes. Once the member resumes and the
/// flush is over, A leaves: B's flush succeeds without asking A, the block holds
/// both changes, and the stripe is unlocked: a direct write goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_given_up_on_still_writes_back() {
    let tc = TestCluster::start("peer-given-up").await;
    let (a, b) = b_wrote_through_a(&tc).await;
    let geo = tc.client.geometry().clone();
    let (stripe, _) = geo.locate(5);
    let parity = geo.member(stripe, geo.k);
    tc.stop(parity).await;
    let cut = tokio::time::timeout(Duration::from_millis(300), a.flush()).await;
    assert!(
        cut.is_err(),
        "A's flush ended with a member of the stripe hung"
    );
    tc.local.cont(parity).unwrap();
    // Waits for the flush given up on (one operation at a time), and for the
    // notices it sent.
    a.flush().await.expect("A's second flush");
    let contact = a.contact().expect("A serves");
    drop(a);
    // Gone for good: B cannot ask A, only its notice tells B.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(contact).await.is_ok() {
        assert!(std::time::Instant::now() < until, "A still serves");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.flush()
        .await
        .expect("B's flush after A's caller gave up on A's flush");
    assert_block_5(&tc, (1, 100, 2, 200), "after A's flush was given up on").await;
    tc.client
        .write(5, 0, &bytes(7, BS))
        .await
        .expect("the stripe is unlocked once the member resumed");
    assert_eq!(
        read_ok(&tc.client, 5, "after the write").await,
        bytes(7, BS)
    );
}

/// B writes through A's cache; A drops the block without writing it back (as a
/// failed write-back does): B's flush fails with that, and the change is not on the
/// nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_fails_when_the_holder_dropped_a_forwarded_write() {
    let tc = TestCluster::start("peer-dropped").await;
    let (a, b) = b_wrote_through_a(&tc).await;
    a.discard_blocks(&[5]).await;
    assert_forwarded_lost(
        b.flush().await,
        "write-back",
        "B's flush after A dropped its change",
    );
    assert!(
        read_ok(&tc.client, 5, "after the drop")
            .await
            .iter()
            .all(|x| *x == 0),
        "the dropped change is not on the nodes"
    );
    // A block written back normally since is reported as such, and so is a later
    // forwarded write to the block whose earlier change was lost.
    a.write(6, 0, &bytes(3, BS)).await.unwrap();
    b.write(6, 0, &bytes(4, 100)).await.unwrap();
    a.write(5, 0, &bytes(5, BS)).await.unwrap();
    b.write(5, 0, &bytes(6, 100)).await.unwrap();
    assert_eq!(b.len().await, 0, "B's writes went into A's cache");
    b.flush()
        .await
        .expect("forwarded writes that were written back");
    assert_block_5(&tc, (5, 0, 6, 100), "after B's flush").await;
}

/// A holds block 9 in its cache and keeps writing it (each write after a release
/// takes the block again): a plain writer waiting for the block still gets it within
/// its lock timeout, by asking A to let go as often as it finds A holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_writer_is_not_starved_by_a_holder_that_keeps_writing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tc = TestCluster::start("peer-starve").await;
    let a = serving_cache(&tc).await;
    a.write(9, 0, &bytes(3, BS)).await.unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let holder = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let mut writes = 0u64;
            while !stop.load(Ordering::Acquire) {
                let at = (writes as usize % 8) * 512;
                a.write(9, at, &bytes(100 + writes, 512))
                    .await
                    .unwrap_or_else(|e| panic!("A's write {writes}: {e}"));
                writes += 1;
                tokio::task::yield_now().await;
            }
            writes
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let plain = tc.new_client(ClientConfig {
        lock_timeout: Duration::from_secs(3),
        ..client_config()
    });
    for round in 0..3 {
        plain
            .write(9, 0, &bytes(50 + round, 64))
            .await
            .unwrap_or_else(|e| panic!("the waiting writer, round {round}: {e}"));
    }
    stop.store(true, Ordering::Release);
    let writes = holder.await.expect("holder");
    assert!(writes > 10, "A kept writing meanwhile: {writes} writes");
    a.flush().await.unwrap();
    plain.settle_unlocks(Duration::from_secs(5)).await;
    assert_eq!(locks_held(&tc).await, 0);
}
