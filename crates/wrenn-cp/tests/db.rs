//! The query layer against both databases: a fresh SQLite file (WAL) and
//! the PostgreSQL that `scripts/test.sh` starts (`WRENN_TEST_DATABASE_URL`;
//! required in CI, skipped with a message elsewhere). The same assertions
//! run on both, so a query that only one dialect accepts fails here.

mod common;

use std::collections::BTreeMap;

use wrenn_cp::auth::{authenticate, create_key, random_hex, KeyKind};
use wrenn_cp::db::{
    now_ms, platform_team, CapsuleRow, Db, HostRegistration, OnTimeout, Team, TemplateRow,
};
use wrenn_cp::model::Status;
use wrenn_types::ids::{CapsuleId, HostId, TeamId};

async fn exercise(db: &Db) {
    // teams and keys
    let team = Team {
        id: TeamId::random(),
        name: "t".into(),
        slug: format!(
            "{:06x}-{:06x}",
            now_ms() & 0xff_ffff,
            std::process::id() & 0xff_ffff
        ),
        is_admin: false,
        created_at: now_ms(),
    };
    db.insert_team(&team).await.unwrap();
    let (key, secret) = create_key(db, &team.id, "k", KeyKind::Wrenn).await.unwrap();
    assert!(secret.starts_with("wrn_") && secret.len() == 36);
    let (found, t) = authenticate(db, &secret).await.unwrap();
    assert_eq!(
        (found.id.clone(), t.id.clone()),
        (key.id.clone(), team.id.clone())
    );
    let wrong = format!("wrn_{}", "0".repeat(32));
    assert_eq!(
        authenticate(db, &wrong).await.unwrap_err().code,
        "unauthorized"
    );
    assert!(db.keys(&team.id).await.unwrap()[0].last_used.is_some());
    let other = TeamId::random();
    assert!(
        !db.delete_key(&other, &key.id).await.unwrap(),
        "scoped to the team"
    );
    assert!(db.delete_key(&team.id, &key.id).await.unwrap());
    assert!(authenticate(db, &secret).await.is_err());

    // hosts
    let host = wrenn_cp::db::Host {
        id: HostId::random(),
        status: "pending".into(),
        address: String::new(),
        arch: String::new(),
        cpu_cores: 0,
        memory_mb: 0,
        disk_gb: 0,
        created_at: now_ms(),
        last_heartbeat: None,
        agent_token: String::new(),
    };
    let reg_hash = format!("{:064}", now_ms());
    db.insert_host(&host, &reg_hash).await.unwrap();
    let reg = HostRegistration {
        address: "127.0.0.1:9".into(),
        arch: "x86_64".into(),
        cpu_cores: 2,
        memory_mb: 4096,
        disk_gb: 10,
        agent_token: "agent-secret".into(),
    };
    let pending = db.pending_host(&reg_hash).await.unwrap();
    let registered_cert = random_hex(16);
    let later = now_ms() + 60_000;
    let h = db
        .register_host(
            &reg_hash,
            &reg,
            ("refresh-1", later),
            (&registered_cert, later),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending.as_ref(), Some(&h.id));
    assert_eq!(db.pending_host(&reg_hash).await.unwrap(), None, "used up");
    assert_eq!((h.status.as_str(), h.cpu_cores), ("online", 2));
    assert_eq!(h.agent_token, "agent-secret");
    // a heartbeat without a token keeps it; one with a new token replaces it
    let mut beat = reg.clone();
    beat.agent_token = String::new();
    let h2 = db.update_host(&h.id, &beat).await.unwrap().unwrap();
    assert_eq!(h2.agent_token, "agent-secret");
    beat.agent_token = "rotated".into();
    let h2 = db.update_host(&h.id, &beat).await.unwrap().unwrap();
    assert_eq!(h2.agent_token, "rotated");
    // the host monitor: a host heard from at `heard` is not silent since
    // then; since a moment later it is, is marked once, and its next
    // heartbeat brings it back (and says so, once)
    let heard = h2.last_heartbeat.expect("registered and heartbeated");
    let status = |h: Option<wrenn_cp::db::Host>| h.unwrap().status;
    assert!(!db.mark_silent_hosts(heard).await.unwrap().contains(&h.id));
    assert_eq!(status(db.host(&h.id).await.unwrap()), "online");
    assert!(db
        .mark_silent_hosts(heard + 1)
        .await
        .unwrap()
        .contains(&h.id));
    assert_eq!(status(db.host(&h.id).await.unwrap()), "unreachable");
    assert!(
        !db.mark_silent_hosts(heard + 1)
            .await
            .unwrap()
            .contains(&h.id),
        "marked once"
    );
    assert!(db.heartbeat(&h.id).await.unwrap(), "back from unreachable");
    assert_eq!(status(db.host(&h.id).await.unwrap()), "online");
    assert!(!db.heartbeat(&h.id).await.unwrap(), "already online");
    assert!(
        db.register_host(
            &reg_hash,
            &reg,
            ("refresh-x", later),
            (&random_hex(16), later)
        )
        .await
        .unwrap()
        .is_none(),
        "one use"
    );
    // refresh tokens: each is good once (no grace here), and not after it
    // expires; with a grace, a used one is good once more
    let none = now_ms() - 1;
    let (refreshed_cert, refused_cert) = (random_hex(16), random_hex(16));
    let serials = |all: Vec<(String, i64)>| all.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    let found = db.refreshable_host("refresh-1").await.unwrap();
    assert_eq!(found.as_ref(), Some(&h.id));
    let r = db
        .rotate_refresh(
            &h.id,
            "refresh-1",
            ("refresh-2", later),
            none,
            (&refreshed_cert, later),
        )
        .await;
    assert_eq!(r.unwrap().map(|h| h.id), Some(h.id.clone()));
    // with the token, the certificate: the one from the registration is revoked
    let revoked = serials(db.revoked_certs(now_ms()).await.unwrap());
    assert!(revoked.contains(&registered_cert) && !revoked.contains(&refreshed_cert));
    assert_eq!(db.refreshable_host("refresh-1").await.unwrap(), None);
    let again = db
        .rotate_refresh(
            &h.id,
            "refresh-1",
            ("refresh-3", later),
            none,
            (&refused_cert, later),
        )
        .await;
    assert!(again.unwrap().is_none(), "a used refresh token");
    // (a refused refresh changes no certificate)
    let revoked = serials(db.revoked_certs(now_ms()).await.unwrap());
    assert!(!revoked.contains(&refreshed_cert) && !revoked.contains(&refused_cert));
    let r = db
        .rotate_refresh(
            &h.id,
            "refresh-2",
            ("refresh-4", none),
            later,
            (&random_hex(16), later),
        )
        .await;
    assert!(r.unwrap().is_some());
    let revoked = serials(db.revoked_certs(now_ms()).await.unwrap());
    assert!(
        revoked.contains(&refreshed_cert),
        "replaced by this refresh"
    );
    assert_eq!(
        db.refreshable_host("refresh-4").await.unwrap(),
        None,
        "expired"
    );
    let dead = db
        .rotate_refresh(
            &h.id,
            "refresh-4",
            ("refresh-5", later),
            none,
            (&random_hex(16), later),
        )
        .await;
    assert!(dead.unwrap().is_none(), "an expired refresh token");
    // refresh-2 (used, in its grace) is good once more, and is then gone
    let r = db
        .rotate_refresh(
            &h.id,
            "refresh-2",
            ("refresh-6", later),
            later,
            (&random_hex(16), later),
        )
        .await;
    assert!(r.unwrap().is_some(), "within the grace");
    assert_eq!(db.refreshable_host("refresh-2").await.unwrap(), None);
    let stranger = HostId::random();
    let r = db
        .rotate_refresh(
            &stranger,
            "refresh-6",
            ("refresh-7", later),
            none,
            (&random_hex(16), later),
        )
        .await;
    assert!(r.unwrap().is_none(), "another host's refresh token");
    // certificates: a host's new one revokes its last, deleting the host
    // revokes its newest, and expired ones leave the list
    let certified = wrenn_cp::db::Host {
        id: HostId::random(),
        ..host.clone()
    };
    db.insert_host(&certified, &format!("{:064}", now_ms() + 1))
        .await
        .unwrap();
    let (first, second) = (random_hex(16), random_hex(16));
    let soon = now_ms() + 60_000;
    assert!(db
        .replace_host_cert(&certified.id, (&first, soon))
        .await
        .unwrap());
    let listed = serials(db.revoked_certs(now_ms()).await.unwrap());
    assert!(!listed.contains(&first), "the newest is good");
    assert!(db
        .replace_host_cert(&certified.id, (&second, soon + 1000))
        .await
        .unwrap());
    let listed = serials(db.revoked_certs(now_ms()).await.unwrap());
    assert!(listed.contains(&first) && !listed.contains(&second));
    // (a deleted host's template copies go with it)
    let copied = format!("s-gone{}", now_ms());
    db.add_template_copy(&copied, &certified.id).await.unwrap();
    assert_eq!(
        db.template_copies(&copied).await.unwrap(),
        std::slice::from_ref(&certified.id)
    );
    db.delete_host(&certified.id).await.unwrap();
    assert!(db.template_copies(&copied).await.unwrap().is_empty());
    let revoked = db.revoked_certs(now_ms()).await.unwrap();
    let at = revoked
        .iter()
        .find(|(s, _)| *s == second)
        .map(|(_, at)| *at);
    assert!(at.is_some_and(|at| at <= now_ms()), "{revoked:?}");
    let listed = serials(db.revoked_certs(soon + 500).await.unwrap());
    assert!(!listed.contains(&first) && listed.contains(&second));
    let listed = serials(db.revoked_certs(now_ms()).await.unwrap());
    assert!(!listed.contains(&first), "an expired one is gone for good");
    let third = random_hex(16);
    let gone = db.replace_host_cert(&certified.id, (&third, soon));
    assert!(!gone.await.unwrap(), "a deleted host is certified no more");
    // two refreshes of one host at once (an agent retrying within its
    // grace): both are taken, one after the other, and only the later
    // one's certificate is good
    let raced = wrenn_cp::db::Host {
        id: HostId::random(),
        ..host.clone()
    };
    let raced_registration = format!("{:064}", now_ms() + 2);
    db.insert_host(&raced, &raced_registration).await.unwrap();
    let (token, next_a, next_b) = (random_hex(32), random_hex(32), random_hex(32));
    let (issued, cert_a, cert_b) = (random_hex(16), random_hex(16), random_hex(16));
    let registered = db
        .register_host(&raced_registration, &reg, (&token, later), (&issued, later))
        .await
        .unwrap();
    assert!(registered.is_some());
    let (a, b) = tokio::join!(
        db.rotate_refresh(&raced.id, &token, (&next_a, later), later, (&cert_a, later)),
        db.rotate_refresh(&raced.id, &token, (&next_b, later), later, (&cert_b, later)),
    );
    assert!(a.unwrap().is_some() && b.unwrap().is_some());
    let listed = serials(db.revoked_certs(now_ms()).await.unwrap());
    assert!(listed.contains(&issued));
    assert!(
        listed.contains(&cert_a) != listed.contains(&cert_b),
        "exactly one of the two is current"
    );
    // the signing key is made once and then read
    let key = db.host_signing_key(|| "k1".into()).await.unwrap();
    assert_eq!(key, "k1");
    assert_eq!(db.host_signing_key(|| "k2".into()).await.unwrap(), "k1");

    // capsules: insert, scoped reads, transitions and the running ledger
    let now = now_ms();
    let mut rows = Vec::new();
    for i in 0..3 {
        let c = CapsuleRow {
            metadata: BTreeMap::from([("k".to_owned(), format!("v{i}"))]),
            created_at: now + i,
            access_token: format!("token-{i}"),
            allow_internet: [None, Some(false), Some(true)][i as usize],
            created_by: (i > 0).then(|| format!("cp-{i}")),
            ..common::capsule_row(&team.id, Some(&h.id), Status::Starting, now)
        };
        db.insert_capsule(&c).await.unwrap();
        rows.push(c);
    }
    assert!(
        db.capsule(&other, &rows[0].id).await.unwrap().is_none(),
        "other teams see nothing"
    );
    let listed = db.capsules(&team.id).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].id, rows[2].id, "newest first");
    assert_eq!(listed[2].metadata["k"], "v0");
    let internet: Vec<_> = listed.iter().map(|c| c.allow_internet).collect();
    assert_eq!(
        internet,
        [Some(true), Some(false), None],
        "as set, or not set"
    );
    let by: Vec<_> = listed.iter().map(|c| c.created_by.as_deref()).collect();
    assert_eq!(by, [Some("cp-2"), Some("cp-1"), None]);
    let c = db
        .transition(&rows[0].id, &[Status::Starting], Status::Running)
        .await
        .unwrap()
        .unwrap();
    assert!(c.started_at.is_some());
    assert_eq!(c.access_token, "token-0");

    // deadlines: only running capsules past their end_at are due
    assert!(db.capsules_due(now_ms()).await.unwrap().is_empty());
    db.set_deadline(&rows[0].id, Some(now - 1), OnTimeout::Pause)
        .await
        .unwrap();
    db.set_deadline(&rows[1].id, Some(now - 1), OnTimeout::Kill)
        .await
        .unwrap();
    let due = db.capsules_due(now_ms()).await.unwrap();
    assert_eq!(
        due.iter().map(|c| &c.id).collect::<Vec<_>>(),
        [&rows[0].id],
        "rows[1] is not running"
    );
    assert_eq!(due[0].on_timeout, OnTimeout::Pause);
    assert_eq!(due[0].end_at, Some(now - 1));
    assert!(db.capsules_due(now - 2).await.unwrap().is_empty());
    assert_eq!(db.running_capsules().await.unwrap().len(), 1);

    // the capsule log: oldest first, from a time on
    db.add_log(&rows[0].id, "info", "started").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    db.add_log(&rows[0].id, "warn", "timeout reached")
        .await
        .unwrap();
    db.add_log(&rows[1].id, "info", "someone else's")
        .await
        .unwrap();
    let logs = db.logs(&rows[0].id, 0).await.unwrap();
    assert_eq!(
        logs.iter()
            .map(|l| (l.level.as_str(), l.message.as_str()))
            .collect::<Vec<_>>(),
        [("info", "started"), ("warn", "timeout reached")]
    );
    assert_eq!(db.logs(&rows[0].id, logs[1].at_ms).await.unwrap().len(), 1);
    db.set_deadline(&rows[0].id, None, OnTimeout::Kill)
        .await
        .unwrap();
    assert!(db.capsules_due(now_ms()).await.unwrap().is_empty());
    assert!(
        db.transition(&rows[0].id, &[Status::Paused], Status::Running)
            .await
            .unwrap()
            .is_none(),
        "a transition from the wrong state does nothing"
    );
    assert_eq!(db.host_load(&h.id).await.unwrap(), (3, 1536, 0, 0));
    db.transition(&rows[0].id, &[Status::Running], Status::Paused)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(db.host_load(&h.id).await.unwrap(), (2, 1024, 1, 512));
    let runs = db.runs(&team.id, 0, now_ms() + 1).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert!(runs[0].ended_at.is_some());
    db.transition(&rows[1].id, &[], Status::Stopped)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        db.capsules(&team.id).await.unwrap().len(),
        2,
        "stopped ones leave the list"
    );
    assert_eq!(db.capsules_on(&h.id).await.unwrap().len(), 2);

    // metrics kept across a pause
    let pts = [wrenn_cp::db::MetricRow {
        at_ms: now,
        cpu_pct: 12.5,
        mem_bytes: 1 << 20,
        disk_bytes: 7,
    }];
    db.save_metrics(&rows[0].id, &pts).await.unwrap();
    let back = db.saved_metrics(&rows[0].id, now - 1).await.unwrap();
    assert_eq!(
        (back.len(), back[0].cpu_pct, back[0].disk_bytes),
        (1, 12.5, 7)
    );
    // a day of tiers (several statements' worth) replaces what was kept
    let day: Vec<_> = (0..650)
        .map(|i| wrenn_cp::db::MetricRow {
            at_ms: now - 86_400_000 + i * 60_000,
            cpu_pct: i as f64,
            mem_bytes: i,
            disk_bytes: 1,
        })
        .collect();
    db.save_metrics(&rows[0].id, &day).await.unwrap();
    let back = db.saved_metrics(&rows[0].id, 0).await.unwrap();
    assert_eq!(back.len(), 650);
    assert!(back
        .iter()
        .enumerate()
        .all(|(i, p)| p.mem_bytes == i as i64));

    // templates: the team's own shadows the platform's; upsert replaces
    let mut t = TemplateRow {
        team_id: platform_team(),
        name: format!("tpl{}", now_ms()),
        agent_name: "p".into(),
        kind: "base".into(),
        host_id: None,
        vcpus: None,
        memory_mb: None,
        size_bytes: 1,
        default_user: String::new(),
        protected: true,
        metadata: BTreeMap::new(),
        created_at: now,
    };
    db.put_template(&t).await.unwrap();
    let name = t.name.clone();
    assert_eq!(
        db.resolve_template(&team.id, &name)
            .await
            .unwrap()
            .unwrap()
            .agent_name,
        "p"
    );
    t.team_id = team.id.clone();
    t.agent_name = "s-own".into();
    t.kind = "snapshot".into();
    t.vcpus = Some(2);
    db.put_template(&t).await.unwrap();
    t.size_bytes = 99;
    db.put_template(&t).await.unwrap();
    let r = db.resolve_template(&team.id, &name).await.unwrap().unwrap();
    assert_eq!(
        (r.agent_name.as_str(), r.vcpus, r.size_bytes),
        ("s-own", Some(2), 99)
    );
    assert!(
        db.resolve_template(&other, &name)
            .await
            .unwrap()
            .unwrap()
            .team_id
            == platform_team()
    );
    assert!(db.template_named_on_host("s-own").await.unwrap());
    assert!(db.delete_template(&team.id, &name).await.unwrap());
    assert!(!db.template_named_on_host("s-own").await.unwrap());

    // where a host-side template's files are: the host its row names (none:
    // every host), and the copies on others, each recorded once
    let (home, h2, h3) = (HostId::random(), HostId::random(), HostId::random());
    t.agent_name = format!("s-copied{}", now_ms());
    t.host_id = Some(home.clone());
    db.put_template(&t).await.unwrap();
    let copied = t.agent_name.as_str();
    assert_eq!(db.template_homes(copied).await.unwrap(), [Some(home)]);
    assert_eq!(db.template_homes("p").await.unwrap(), [None]);
    assert!(db.template_homes("s-none").await.unwrap().is_empty());
    assert!(db.template_copies(copied).await.unwrap().is_empty());
    for h in [&h2, &h3, &h2] {
        db.add_template_copy(copied, h).await.unwrap();
    }
    let mut all = db.template_copies(copied).await.unwrap();
    all.sort();
    let mut want = [h2.clone(), h3.clone()];
    want.sort();
    assert_eq!(all, want);
    db.drop_template_copy(copied, Some(&h2)).await.unwrap();
    assert_eq!(
        db.template_copies(copied).await.unwrap(),
        std::slice::from_ref(&h3)
    );
    db.add_template_copy(copied, &h2).await.unwrap();
    db.drop_template_copy(copied, None).await.unwrap();
    assert!(db.template_copies(copied).await.unwrap().is_empty());
    assert!(db.delete_template(&team.id, &name).await.unwrap());

    // usage: a finished day rolls up once, per team, and stays as rolled
    const DAY: i64 = 86_400_000;
    // a day long past that no earlier run of this test rolled up
    let n = 5_000 + (now_ms() / 7) % 10_000;
    let (start, end) = (n * DAY, (n + 1) * DAY);
    let date = time::OffsetDateTime::from_unix_timestamp(start / 1000)
        .unwrap()
        .date();
    let day = format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        date.month() as u8,
        date.day()
    );
    let hour = 3_600_000;
    let run = |vcpus, memory_mb, from: i64, to: i64| wrenn_cp::db::Run {
        vcpus,
        memory_mb,
        started_at: from,
        ended_at: Some(to),
    };
    let spare = CapsuleId::random();
    for (t, r) in [
        // 2 h of 2 vCPUs and 1 GiB
        (&team.id, run(2, 1024, start + 10 * hour, start + 12 * hour)),
        // from the day before: its last 30 min count
        (&team.id, run(1, 512, start - hour, start + hour / 2)),
        // into the next day: its first hour counts
        (&team.id, run(4, 2048, end - hour, end + hour)),
        // another team's
        (&other, run(8, 8192, start, end)),
    ] {
        db.insert_run(&spare, t, &r).await.unwrap();
    }
    db.roll_up_day(&day, start, end).await.unwrap();
    let got = db.rolled_usage(&team.id, &day, &day).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    let (cpu, ram) = got[&day];
    assert!((cpu - (240.0 + 30.0 + 240.0)).abs() < 1e-6, "{cpu}");
    assert!(
        (ram - (122_880.0 + 15_360.0 + 122_880.0)).abs() < 1e-6,
        "{ram}"
    );
    assert_eq!(
        db.rolled_usage(&other, &day, &day).await.unwrap()[&day],
        (8.0 * 1440.0, 8192.0 * 1440.0)
    );
    // a team that used nothing that day: rolled up, zero
    assert_eq!(
        db.rolled_usage(&TeamId::random(), &day, &day)
            .await
            .unwrap()[&day],
        (0.0, 0.0)
    );
    // the day is final: a late run does not change it, a second pass is a no-op
    db.insert_run(&spare, &team.id, &run(1, 1, start, start + hour))
        .await
        .unwrap();
    db.roll_up_day(&day, start, end).await.unwrap();
    assert_eq!(
        db.rolled_usage(&team.id, &day, &day).await.unwrap()[&day],
        (cpu, ram)
    );
    let (last, first) = db.rollup_bounds().await.unwrap();
    assert!(last.is_some_and(|l| l >= day));
    assert!(first.is_some_and(|f| f <= start - hour));
    // days outside the range are not returned
    assert!(db
        .rolled_usage(&team.id, "1970-01-01", "1970-01-02")
        .await
        .unwrap()
        .is_empty());
}

/// Many transitions of one capsule at once (the API, the reconciler and
/// the TTL reaper do this): every one succeeds, and the running ledger
/// has at most one open run. On SQLite a transaction that reads before it
/// writes fails at once ("database is locked", no busy wait) when another
/// writer committed in between.
async fn concurrent_transitions(db: &Db) {
    let team = Team {
        id: TeamId::random(),
        name: "busy".into(),
        slug: format!("busy-{}", now_ms()),
        is_admin: false,
        created_at: now_ms(),
    };
    db.insert_team(&team).await.unwrap();
    let c = common::capsule_row(&team.id, None, Status::Starting, now_ms());
    db.insert_capsule(&c).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (db, id) = (db.clone(), c.id.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let to = if (t + i) % 2 == 0 {
                    Status::Running
                } else {
                    Status::Paused
                };
                db.transition(&id, &[], to).await?;
            }
            Ok::<(), wrenn_cp::db::DbError>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("a concurrent transition failed");
    }
    let status = db.capsule(&team.id, &c.id).await.unwrap().unwrap().status;
    assert!(
        matches!(status, Status::Running | Status::Paused),
        "{status}"
    );
}

#[tokio::test]
async fn queries_work_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("w.db").display());
    let db = Db::open(&url).await.unwrap();
    exercise(&db).await;
    concurrent_transitions(&db).await;
    db.close().await;
    // reopening runs no migration twice and keeps the data (WAL file present)
    let db = Db::open(&url).await.unwrap();
    assert!(dir.path().join("w.db-wal").exists() || dir.path().join("w.db").exists());
    assert!(!db.teams().await.unwrap().is_empty());
}

/// The test PostgreSQL's URL; None (and a message) where there is none,
/// which CI never allows.
fn postgres_url() -> Option<String> {
    let url = std::env::var("WRENN_TEST_DATABASE_URL").ok();
    if url.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide WRENN_TEST_DATABASE_URL (scripts/test.sh starts PostgreSQL)"
        );
        eprintln!("skipped: WRENN_TEST_DATABASE_URL is not set (scripts/test.sh sets it)");
    }
    url
}

#[tokio::test]
async fn queries_work_on_postgres() {
    let Some(url) = postgres_url() else { return };
    let db = Db::open(&url).await.unwrap();
    exercise(&db).await;
    concurrent_transitions(&db).await;
    // migrating again is a no-op
    Db::open(&url).await.unwrap();
}

/// Placement's lock on PostgreSQL holds across pools, as across control
/// planes sharing the database, and goes with its guard; a wait for it
/// that is given up (its request cancelled) leaves it held by nobody.
#[tokio::test]
async fn placing_excludes_other_control_planes_sharing_postgres() {
    use std::time::Duration;
    use tokio::time::timeout;
    // (SQLite: the file is one wrenn up's; nothing is taken)
    let dir = tempfile::tempdir().unwrap();
    let lite = Db::open(&format!("sqlite:{}", dir.path().join("w.db").display()))
        .await
        .unwrap();
    let one = lite.placing().await.unwrap();
    timeout(Duration::from_secs(1), lite.placing())
        .await
        .expect("SQLite's placing waited")
        .unwrap();
    drop(one);
    let Some(url) = postgres_url() else { return };
    let (a, b) = (Db::open(&url).await.unwrap(), Db::open(&url).await.unwrap());
    let held = a.placing().await.unwrap();
    let mut waiting = Box::pin(b.placing());
    assert!(
        timeout(Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a second control plane took placement's lock while the first held it"
    );
    drop(held);
    let held = timeout(Duration::from_secs(10), waiting)
        .await
        .expect("placement's lock stayed held after its guard dropped")
        .unwrap();
    let mut given_up = Box::pin(a.placing());
    assert!(timeout(Duration::from_millis(300), &mut given_up)
        .await
        .is_err());
    drop(given_up);
    drop(held);
    for db in [&a, &b] {
        let again = timeout(Duration::from_secs(10), db.placing())
            .await
            .expect("placement's lock stayed held after a given-up wait")
            .unwrap();
        drop(again);
    }
}

#[tokio::test]
async fn unknown_database_schemes_are_refused() {
    let e = Db::open("mysql://x").await.unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
}
