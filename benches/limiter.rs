//! Micro-benchmarks of the rate limiter: one decision for many identities,
//! and one hot identity taken from several threads at once (contention on
//! its shard). `cargo bench --bench limiter`.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use sluice::proxy::ctx::IdentityId;
use sluice::state::MemoryLimiter;
use sluice::state::limiter::{BucketKey, Scope};

fn main() {
    divan::main();
}

static LIMITER: LazyLock<Arc<MemoryLimiter>> = LazyLock::new(|| Arc::new(MemoryLimiter::default()));

fn key(i: usize) -> BucketKey {
    BucketKey {
        scope: Scope::Tier(Arc::from("pro")),
        identity: IdentityId::Key(Arc::from(format!("identity-{i}"))),
    }
}

#[divan::bench]
fn many_identities(bencher: divan::Bencher) {
    let keys: Vec<BucketKey> = (0..10_000).map(key).collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % keys.len();
        LIMITER
            .take(&keys[i], u64::MAX / 2, 1, Instant::now())
            .allowed
    });
}

#[divan::bench(threads = [1, 2, 4])]
fn one_hot_identity(bencher: divan::Bencher) {
    let hot = key(usize::MAX);
    bencher.bench(|| LIMITER.take(&hot, u64::MAX / 2, 1, Instant::now()).allowed);
}

#[divan::bench(threads = [1, 2, 4])]
fn concurrency_slot(bencher: divan::Bencher) {
    let hot = key(usize::MAX - 1);
    bencher.bench(|| LIMITER.acquire(&hot, u64::MAX).is_some());
}
