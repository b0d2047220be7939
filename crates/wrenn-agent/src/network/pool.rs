//! Slot allocation: slot `n` is the `n`-th /30 of the pool. The set of used
//! slots is rebuilt from capsule records at start, so it survives restarts
//! without a file of its own.

use std::collections::BTreeSet;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("address pool {pool} is exhausted ({size} capsules)")]
    Exhausted { pool: ipnet::Ipv4Net, size: u32 },
}

#[derive(Debug)]
pub struct Pool {
    net: ipnet::Ipv4Net,
    size: u32,
    used: Mutex<BTreeSet<u32>>,
}

impl Pool {
    pub fn new(net: ipnet::Ipv4Net) -> Self {
        let size = if net.prefix_len() >= 30 {
            0
        } else {
            1u32 << (30 - net.prefix_len())
        };
        Pool {
            net,
            size,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn net(&self) -> ipnet::Ipv4Net {
        self.net
    }

    /// Mark a slot taken (an adopted capsule's). False if it already was.
    pub fn claim(&self, index: u32) -> bool {
        index < self.size && self.used.lock().unwrap().insert(index)
    }

    /// The lowest free slot.
    pub fn allocate(&self) -> Result<u32, PoolError> {
        let mut used = self.used.lock().unwrap();
        let free = (0..self.size).find(|i| !used.contains(i));
        match free {
            Some(i) => {
                used.insert(i);
                Ok(i)
            }
            None => Err(PoolError::Exhausted {
                pool: self.net,
                size: self.size,
            }),
        }
    }

    pub fn release(&self, index: u32) {
        self.used.lock().unwrap().remove(&index);
    }

    pub fn in_use(&self) -> usize {
        self.used.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_and_runs_out() {
        let p = Pool::new("10.1.0.0/28".parse().unwrap());
        assert_eq!([p.allocate().unwrap(), p.allocate().unwrap()], [0, 1]);
        assert!(p.claim(3));
        assert!(!p.claim(3));
        assert!(!p.claim(4), "outside the pool");
        assert_eq!(p.allocate().unwrap(), 2);
        assert!(matches!(
            p.allocate(),
            Err(PoolError::Exhausted { size: 4, .. })
        ));
        p.release(1);
        assert_eq!(p.allocate().unwrap(), 1);
    }
}
