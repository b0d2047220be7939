//! Locks by key, taken by async work. One per capsule for the control
//! plane's lifecycle operations
//! (destroy, pause, resume, snapshot, E2B's connect): each reads the
//! capsule's state again under it, so two of them on one capsule never
//! act on the same stale state (five E2B `connect`s to a paused sandbox
//! resumed it once and got four 409s; a `connect` that came during a
//! pause answered "running" and the pause then went through). One per
//! team and template name for snapshots (concurrent overwrites of one
//! name each replaced the row, and the layers of all but the last were
//! never collected).
//!
//! And [`Claims`]: keys that one piece of work at a time holds, without
//! waiting (a template copied ahead to a host, a snapshot being taken).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use wrenn_types::ids::CapsuleId;

/// The locks someone holds or waits for, each with its count of holders
/// and waiters; an entry goes with the last of them.
#[derive(Debug)]
pub struct Locks<K>(Mutex<HashMap<K, Entry>>);

/// A key's lock and its count of holders and waiters.
type Entry = (Arc<tokio::sync::Mutex<()>>, usize);

/// By capsule: lifecycle operations.
pub type CapsuleLocks = Locks<CapsuleId>;

impl<K> Default for Locks<K> {
    fn default() -> Self {
        Locks(Mutex::default())
    }
}

/// Held while one operation works on its key (a lifecycle operation on
/// a capsule, a snapshot on a name). (Fields drop
/// in order: the lock is let go before the entry is counted out.)
#[derive(Debug)]
pub struct Guard<'a, K: Hash + Eq> {
    _held: OwnedMutexGuard<()>,
    _user: User<'a, K>,
}

/// Counts one user of an entry (a waiter, then the holder); leaving,
/// it takes the entry with it if it was the last.
#[derive(Debug)]
struct User<'a, K: Hash + Eq> {
    locks: &'a Locks<K>,
    id: K,
}

impl<K: Hash + Eq> Drop for User<'_, K> {
    fn drop(&mut self) {
        let mut map = self.locks.0.lock().unwrap();
        if let Some((_, users)) = map.get_mut(&self.id) {
            *users -= 1;
            if *users == 0 {
                map.remove(&self.id);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> Locks<K> {
    /// Wait for `id`'s lock (in arrival order: tokio's mutex is fair).
    /// Dropped while it waits, it leaves nothing behind.
    pub async fn lock(&self, id: &K) -> Guard<'_, K> {
        let m = {
            let mut map = self.0.lock().unwrap();
            let (m, users) = map.entry(id.clone()).or_default();
            *users += 1;
            m.clone()
        };
        let user = User {
            locks: self,
            id: id.clone(),
        };
        Guard {
            _held: m.lock_owned().await,
            _user: user,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Keys that one piece of work at a time claims; others see them taken
/// and go on without waiting.
#[derive(Debug)]
pub struct Claims<K>(Mutex<HashSet<K>>);

impl<K> Default for Claims<K> {
    fn default() -> Self {
        Claims(Mutex::default())
    }
}

/// A claimed key: let go when dropped, however the work ends (a panic
/// too, so a key is never left taken).
#[derive(Debug)]
pub struct Claim<'a, K: Hash + Eq> {
    claims: &'a Claims<K>,
    key: K,
}

impl<K: Hash + Eq> Drop for Claim<'_, K> {
    fn drop(&mut self) {
        self.claims.0.lock().unwrap().remove(&self.key);
    }
}

impl<K: Hash + Eq + Clone> Claims<K> {
    /// Claim `key`; `None` while someone else holds it.
    pub fn claim(&self, key: K) -> Option<Claim<'_, K>> {
        // The lock is let go before a refused claim could be built and
        // dropped: its drop would lock again and free the holder's key.
        let claimed = self.0.lock().unwrap().insert(key.clone());
        claimed.then(|| Claim { claims: self, key })
    }

    pub fn is_claimed(&self, key: &K) -> bool {
        self.0.lock().unwrap().contains(key)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_holder_per_capsule_and_no_entry_left() {
        let locks = Arc::new(CapsuleLocks::default());
        let (a, b) = (CapsuleId::random(), CapsuleId::random());
        let held = locks.lock(&a).await;
        // another capsule's lock is free
        drop(locks.lock(&b).await);
        let waiter = tokio::spawn({
            let (locks, a) = (locks.clone(), a.clone());
            async move {
                let _g = locks.lock(&a).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "a second holder of one capsule's lock"
        );
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter gets the lock")
            .unwrap();
        assert_eq!(locks.len(), 0, "entries go with their last holder");
    }

    #[tokio::test]
    async fn a_waiter_dropped_while_waiting_leaves_no_entry() {
        let locks = CapsuleLocks::default();
        let a = CapsuleId::random();
        let held = locks.lock(&a).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(20), locks.lock(&a)).await;
        assert!(gave_up.is_err());
        drop(held);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_claim_is_one_holders_and_let_go_by_a_panic_too() {
        let claims = Arc::new(Claims::default());
        let held = claims.claim("a").expect("a free key");
        assert!(claims.claim("a").is_none(), "a key claimed twice");
        assert!(claims.claim("b").is_some(), "another key is free");
        drop(held);
        assert!(claims.claim("a").is_some(), "a key let go is free again");
        let panicked = tokio::spawn({
            let claims = claims.clone();
            async move {
                let _held = claims.claim("a").unwrap();
                panic!("the work failed");
            }
        })
        .await;
        assert!(panicked.is_err());
        assert!(
            !claims.is_claimed(&"a"),
            "a claim outlived its panicked work"
        );
    }
}
