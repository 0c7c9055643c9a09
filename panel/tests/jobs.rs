//! The durable job engine on both backends: a job exists only if the transaction that
//! enqueued it committed; concurrent claimers never run a job twice; an expired lease lets
//! another worker re-run the job and fences the old one; backoff, dead-letter and retry;
//! jobs of one server run one at a time in order; the worker loop end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestDb;
use diesel::prelude::*;
use mamba_panel::audit::Actor;
use mamba_panel::authz::{self, TenantScope};
use mamba_panel::db::{Db, DbError};
use mamba_panel::ids::{JobId, ServerId};
use mamba_panel::jobs::worker::{self, Handler, JobContext, JobError};
use mamba_panel::jobs::{self, Job, JobFilter, JobKind, JobStatus, Outcome, Settings};
use mamba_panel::pagination::PageQuery;
use mamba_panel::request_meta::RequestMeta;
use serde_json::json;

both_backends!(
    a_job_exists_only_if_its_transaction_commits,
    concurrent_claimers_never_run_a_job_twice,
    an_expired_lease_reruns_the_job_and_fences_the_old_worker,
    failures_back_off_then_go_to_the_dead_letter_list_and_can_be_retried,
    jobs_of_one_server_run_one_at_a_time_in_order,
    workers_run_every_job_once_in_server_order_and_stop_gracefully,
    a_server_s_jobs_are_visible_to_its_tenant_only,
    operators_list_and_retry_jobs_over_the_api,
    an_idle_worker_starts_a_job_at_once_when_woken,
    finished_jobs_are_pruned_after_their_retention,
);

fn settings() -> Settings {
    Settings {
        lease: Duration::from_secs(30),
        max_attempts: 3,
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(100),
        poll_interval: Duration::from_millis(50),
    }
}

fn enqueue(db: &Db, server: Option<&ServerId>, kind: JobKind) -> JobId {
    let mut conn = db.get_blocking().unwrap();
    jobs::enqueue(&mut conn, None, server, kind, &json!({})).unwrap()
}

fn claim(db: &Db, owner: &str, lease: Duration) -> Option<Job> {
    let mut conn = db.get_blocking().unwrap();
    jobs::claim(&mut conn, owner, lease).unwrap()
}

fn get(db: &Db, id: &JobId) -> Job {
    let mut conn = db.get_blocking().unwrap();
    jobs::get(&mut conn, id).unwrap().unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    common::wait_until(Duration::from_secs(30), what, &mut f);
}

async fn a_job_exists_only_if_its_transaction_commits(t: TestDb) {
    let server = ServerId::generate();
    let mut conn = t.db.get_blocking().unwrap();
    let rolled_back: Result<(), diesel::result::Error> = conn.transaction(|conn| {
        jobs::enqueue(conn, None, Some(&server), JobKind::ServerInstall, &json!({})).unwrap();
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert!(rolled_back.is_err());
    let page = jobs::list(
        &mut conn,
        &JobFilter::default(),
        &PageQuery::default().check().unwrap(),
    )
    .unwrap();
    assert!(
        page.items.is_empty(),
        "a rolled-back enqueue left {:?}",
        page.items
    );

    let id = conn
        .transaction(|conn| {
            jobs::enqueue(
                conn,
                None,
                Some(&server),
                JobKind::ServerPower,
                &json!({"action": "start"}),
            )
        })
        .unwrap();
    let job = jobs::get(&mut conn, &id).unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.kind, JobKind::ServerPower);
    assert_eq!(job.payload, json!({"action": "start"}));
    assert_eq!(job.server_id.as_ref(), Some(&server));
    assert_eq!(job.attempts, 0);
}

async fn concurrent_claimers_never_run_a_job_twice(t: TestDb) {
    let servers: Vec<ServerId> = (0..5).map(|_| ServerId::generate()).collect();
    let mut expected = HashSet::new();
    for i in 0..60 {
        // A third without a server, the rest spread over five servers.
        let server = (i % 3 != 0).then(|| &servers[i % 5]);
        expected.insert(enqueue(&t.db, server, JobKind::ServerUpdate));
    }
    let runs: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (db, runs) = (t.db.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            let owner = format!("claimer-{w}");
            let mut idle = 0;
            while idle < 40 {
                let o = owner.clone();
                let job = db
                    .run(move |conn| jobs::claim(conn, &o, Duration::from_secs(60)).map_err(DbError::from))
                    .await
                    .unwrap();
                match job {
                    Some(job) => {
                        idle = 0;
                        runs.lock().unwrap().push(job.id.clone());
                        let o = owner.clone();
                        let done = db
                            .run(move |conn| jobs::succeed(conn, &job.id, &o).map_err(DbError::from))
                            .await
                            .unwrap();
                        assert!(done);
                    }
                    None => {
                        idle += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let runs = runs.lock().unwrap().clone();
    let unique: HashSet<JobId> = runs.iter().cloned().collect();
    assert_eq!(unique.len(), runs.len(), "a job ran twice");
    assert_eq!(unique, expected, "every job ran");
    for id in &expected {
        let job = get(&t.db, id);
        assert_eq!(job.status, JobStatus::Succeeded);
        assert_eq!(job.attempts, 1);
    }
}

async fn an_expired_lease_reruns_the_job_and_fences_the_old_worker(t: TestDb) {
    let id = enqueue(&t.db, Some(&ServerId::generate()), JobKind::ServerInstall);
    let first = claim(&t.db, "dead-worker", Duration::from_millis(300)).unwrap();
    assert_eq!(first.id, id);
    assert_eq!(first.attempts, 1);
    assert_eq!(first.status, JobStatus::Running);
    {
        let mut conn = t.db.get_blocking().unwrap();
        assert!(jobs::record_step(&mut conn, &id, "dead-worker", "pushed", &json!({"n": 1})).unwrap());
    }
    // While the lease lives, nobody else gets it.
    assert!(claim(&t.db, "other", Duration::from_secs(60)).is_none());
    let mut second = None;
    wait_until("the lease runs out and another worker claims the job", || {
        second = claim(&t.db, "other", Duration::from_secs(60));
        second.is_some()
    });
    let second = second.unwrap();
    assert_eq!(second.id, id);
    assert_eq!(second.attempts, 2);
    assert_eq!(second.lease_owner.as_deref(), Some("other"));
    // The resumed job sees where the first one got to.
    assert_eq!(second.step.as_deref(), Some("pushed"));
    assert_eq!(second.progress, json!({"n": 1}));

    let mut conn = t.db.get_blocking().unwrap();
    // The old worker wakes up: every write it tries is refused.
    assert!(!jobs::renew(&mut conn, &id, "dead-worker", Duration::from_secs(60)).unwrap());
    assert!(!jobs::record_step(&mut conn, &id, "dead-worker", "x", &json!({})).unwrap());
    assert!(!jobs::succeed(&mut conn, &id, "dead-worker").unwrap());
    assert_eq!(
        jobs::fail(&mut conn, &id, "dead-worker", "late", None, true).unwrap(),
        Outcome::LeaseLost
    );
    assert!(jobs::renew(&mut conn, &id, "other", Duration::from_secs(60)).unwrap());
    assert!(jobs::succeed(&mut conn, &id, "other").unwrap());
    let job = jobs::get(&mut conn, &id).unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert!(job.finished_at.is_some());
    assert_eq!(job.lease_owner, None);
}

async fn failures_back_off_then_go_to_the_dead_letter_list_and_can_be_retried(t: TestDb) {
    let s = settings();
    let id = enqueue(&t.db, None, JobKind::ServerBackup);
    for attempt in 1..=3 {
        let mut job = None;
        wait_until(&format!("attempt {attempt} is claimable"), || {
            job = claim(&t.db, "w", s.lease);
            job.is_some()
        });
        let job = job.unwrap();
        assert_eq!(job.attempts, attempt);
        let retry_in = jobs::next_try(&job, true, &s);
        let mut conn = t.db.get_blocking().unwrap();
        let before = mamba_panel::db::now_ms();
        let outcome = jobs::fail(&mut conn, &id, "w", &format!("boom {attempt}"), retry_in, true).unwrap();
        if attempt < 3 {
            let Outcome::Requeued { run_after } = outcome else {
                panic!("attempt {attempt}: {outcome:?}");
            };
            // At least half the (capped) exponential delay lies ahead.
            let full = (20i64 << (attempt - 1)).min(100);
            assert!(
                run_after >= before + full / 2,
                "attempt {attempt}: {run_after} vs {before}"
            );
            let queued = jobs::get(&mut conn, &id).unwrap().unwrap();
            assert_eq!(queued.status, JobStatus::Queued);
            assert_eq!(
                queued.last_error.as_deref(),
                Some(format!("boom {attempt}").as_str())
            );
        } else {
            assert_eq!(outcome, Outcome::Dead);
        }
    }
    let dead = get(&t.db, &id);
    assert_eq!(dead.status, JobStatus::Dead);
    assert!(dead.finished_at.is_some());
    assert!(claim(&t.db, "w", s.lease).is_none(), "a dead job is not claimed");
    let mut conn = t.db.get_blocking().unwrap();
    let page = jobs::list(
        &mut conn,
        &JobFilter {
            status: Some(JobStatus::Dead),
            ..JobFilter::default()
        },
        &PageQuery::default().check().unwrap(),
    )
    .unwrap();
    assert_eq!(
        page.items.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![id.clone()]
    );

    // A permanent error fails at once, with attempts left.
    let permanent = enqueue(&t.db, None, JobKind::ServerPower);
    let job = claim(&t.db, "w", s.lease).unwrap();
    assert_eq!(job.id, permanent);
    assert_eq!(jobs::next_try(&job, false, &s), None);
    assert_eq!(
        jobs::fail(&mut conn, &permanent, "w", "refused", None, false).unwrap(),
        Outcome::Failed
    );
    assert_eq!(
        jobs::get(&mut conn, &permanent).unwrap().unwrap().status,
        JobStatus::Failed
    );

    // Operators put them back; a queued job cannot be "retried".
    let meta = RequestMeta::system();
    let again = jobs::retry(&mut conn, &id, &Actor::System, &meta, |_, _| Ok(())).unwrap();
    assert_eq!(again.status, JobStatus::Queued);
    assert_eq!(again.attempts, 0);
    assert_eq!(again.finished_at, None);
    let err = jobs::retry(&mut conn, &id, &Actor::System, &meta, |_, _| Ok(())).unwrap_err();
    assert_eq!(err.status.as_u16(), 409);
    assert_eq!(
        jobs::retry(
            &mut conn,
            &JobId::generate(),
            &Actor::System,
            &meta,
            |_, _| Ok(())
        )
        .unwrap_err()
        .status
        .as_u16(),
        404
    );
    let audited: i64 = mamba_panel::db::schema::audit_log::table
        .filter(mamba_panel::db::schema::audit_log::action.eq("job.retry"))
        .count()
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(audited, 1);
    drop(conn);
    let job = claim(&t.db, "w", s.lease).unwrap();
    assert_eq!((job.id, job.attempts), (id, 1));
}

async fn jobs_of_one_server_run_one_at_a_time_in_order(t: TestDb) {
    let (s, other) = (ServerId::generate(), ServerId::generate());
    let j1 = enqueue(&t.db, Some(&s), JobKind::ServerInstall);
    let j2 = enqueue(&t.db, Some(&s), JobKind::ServerPower);
    let j3 = enqueue(&t.db, Some(&other), JobKind::ServerInstall);
    let lease = Duration::from_secs(60);
    assert_eq!(claim(&t.db, "a", lease).unwrap().id, j1);
    // j2 waits for j1; the other server's job does not.
    assert_eq!(claim(&t.db, "b", lease).unwrap().id, j3);
    assert!(claim(&t.db, "c", lease).is_none());
    let mut conn = t.db.get_blocking().unwrap();
    // A failed attempt that is requeued still holds its place: j2 keeps waiting.
    assert!(matches!(
        jobs::fail(
            &mut conn,
            &j1,
            "a",
            "later",
            Some(Duration::from_millis(200)),
            true
        )
        .unwrap(),
        Outcome::Requeued { .. }
    ));
    drop(conn);
    assert!(claim(&t.db, "c", lease).is_none(), "j2 overtook the requeued j1");
    let mut again = None;
    wait_until("j1 is claimable after its backoff", || {
        again = claim(&t.db, "a", lease);
        again.is_some()
    });
    assert_eq!(again.unwrap().id, j1);
    let mut conn = t.db.get_blocking().unwrap();
    assert_eq!(
        jobs::fail(&mut conn, &j1, "a", "gone", None, false).unwrap(),
        Outcome::Failed
    );
    drop(conn);
    // A finished (even failed) job no longer holds up the next.
    let second = claim(&t.db, "c", lease).unwrap();
    assert_eq!(second.id, j2);
    // Retrying the older job while j2 runs must not run both at once.
    let mut conn = t.db.get_blocking().unwrap();
    jobs::retry(&mut conn, &j1, &Actor::System, &RequestMeta::system(), |_, _| {
        Ok(())
    })
    .unwrap();
    drop(conn);
    assert!(
        claim(&t.db, "d", lease).is_none(),
        "two jobs of one server ran at once"
    );
    let mut conn = t.db.get_blocking().unwrap();
    assert!(jobs::succeed(&mut conn, &j2, "c").unwrap());
    drop(conn);
    assert_eq!(claim(&t.db, "d", lease).unwrap().id, j1);
}

/// Counts runs, checks that no two jobs of one server overlap, fails chosen jobs once.
#[derive(Default)]
struct Recorder {
    runs: Mutex<Vec<(Option<ServerId>, JobId)>>,
    active: Mutex<HashSet<ServerId>>,
    overlaps: Mutex<usize>,
    fail_once: Mutex<HashSet<JobId>>,
    /// Jobs that block until the worker is stopped.
    hang: Mutex<HashSet<JobId>>,
}

impl Handler for Recorder {
    async fn run(&self, job: &Job, ctx: &JobContext) -> Result<(), JobError> {
        if let Some(s) = &job.server_id
            && !self.active.lock().unwrap().insert(s.clone())
        {
            *self.overlaps.lock().unwrap() += 1;
        }
        ctx.record_step("started", json!({"attempt": job.attempts}))
            .await?;
        if self.hang.lock().unwrap().contains(&job.id) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        if let Some(s) = &job.server_id {
            self.active.lock().unwrap().remove(s);
        }
        if self.fail_once.lock().unwrap().remove(&job.id) {
            return Err(JobError::Retry("first try fails".into()));
        }
        self.runs
            .lock()
            .unwrap()
            .push((job.server_id.clone(), job.id.clone()));
        Ok(())
    }
}

async fn workers_run_every_job_once_in_server_order_and_stop_gracefully(t: TestDb) {
    let servers: Vec<ServerId> = (0..3).map(|_| ServerId::generate()).collect();
    let recorder = Arc::new(Recorder::default());
    let mut all = Vec::new();
    for i in 0..24 {
        let id = enqueue(&t.db, Some(&servers[i % 3]), JobKind::ServerUpdate);
        if i % 5 == 0 {
            recorder.fail_once.lock().unwrap().insert(id.clone());
        }
        all.push(id);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handles = worker::spawn(
        t.db.clone(),
        settings(),
        recorder.clone(),
        4,
        stop_rx,
        Arc::new(tokio::sync::Notify::new()),
    );
    let db = t.db.clone();
    let ids = all.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("every job succeeded", || {
            ids.iter().all(|id| get(&db, id).status == JobStatus::Succeeded)
        })
    })
    .await
    .unwrap();
    let runs = recorder.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), all.len(), "each job succeeded exactly once");
    assert_eq!(
        *recorder.overlaps.lock().unwrap(),
        0,
        "two jobs of one server overlapped"
    );
    let mut per_server: BTreeMap<ServerId, Vec<JobId>> = BTreeMap::new();
    for (server, id) in runs {
        per_server.entry(server.unwrap()).or_default().push(id);
    }
    for (server, ids) in per_server {
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "jobs of {server} ran out of order");
    }
    for id in all.iter().step_by(5) {
        assert_eq!(get(&t.db, id).attempts, 2, "the failed first try was retried");
    }

    // Stopping gives a running job back to the queue, not counting the attempt.
    let hanging = enqueue(&t.db, None, JobKind::ServerBackup);
    recorder.hang.lock().unwrap().insert(hanging.clone());
    let db = t.db.clone();
    let h = hanging.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the job runs", || get(&db, &h).status == JobStatus::Running)
    })
    .await
    .unwrap();
    stop_tx.send(true).unwrap();
    for handle in handles {
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .unwrap()
            .unwrap();
    }
    let job = get(&t.db, &hanging);
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.lease_owner, None);
}

async fn an_idle_worker_starts_a_job_at_once_when_woken(t: TestDb) {
    // A poll far longer than the test waits: only the wake can start the second job in time.
    let settings = Settings {
        poll_interval: Duration::from_secs(600),
        ..settings()
    };
    let recorder = Arc::new(Recorder::default());
    let wake = Arc::new(tokio::sync::Notify::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let first = enqueue(&t.db, None, JobKind::ServerUpdate);
    let handles = worker::spawn(t.db.clone(), settings, recorder.clone(), 1, stop_rx, wake.clone());
    let db = t.db.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the first job ran", || {
            get(&db, &first).status == JobStatus::Succeeded
        })
    })
    .await
    .unwrap();

    // The worker found nothing more and is waiting out its poll.
    let second = enqueue(&t.db, None, JobKind::ServerUpdate);
    wake.notify_one();
    let db = t.db.clone();
    tokio::task::spawn_blocking(move || {
        wait_until("the woken worker ran the second job", || {
            get(&db, &second).status == JobStatus::Succeeded
        })
    })
    .await
    .unwrap();
    stop_tx.send(true).unwrap();
    for handle in handles {
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn finished_jobs_are_pruned_after_their_retention(t: TestDb) {
    use mamba_panel::db::schema::jobs as j;
    const HOUR: i64 = 3_600_000;
    let now = mamba_panel::db::now_ms();
    // (status, hours since it finished); `None`: not finished.
    let cases = [
        (JobStatus::Succeeded, Some(30), false),
        (JobStatus::Succeeded, Some(10), true),
        (JobStatus::Dead, Some(30), true),
        (JobStatus::Failed, Some(30), true),
        (JobStatus::Dead, Some(100), false),
        (JobStatus::Failed, Some(100), false),
        (JobStatus::Queued, None, true),
        (JobStatus::Running, None, true),
    ];
    let mut conn = t.db.get_blocking().unwrap();
    let mut ids = Vec::new();
    for (status, age, _) in cases {
        let id = jobs::enqueue(&mut conn, None, None, JobKind::ServerUpdate, &json!({})).unwrap();
        // Long ago, as the rows of old jobs are: created, run and finished.
        let at = now - age.unwrap_or(200) * HOUR;
        diesel::update(j::table.find(id.as_str()))
            .set((
                j::status.eq(status.as_str()),
                j::created_at.eq(at),
                j::run_after.eq(at),
                j::finished_at.eq(age.map(|_| at)),
            ))
            .execute(&mut conn)
            .unwrap();
        ids.push(id);
    }
    let retention = jobs::Retention {
        succeeded: Duration::from_secs(24 * 3600),
        dead: Duration::from_secs(72 * 3600),
    };
    assert_eq!(jobs::prune(&mut conn, retention, now).unwrap(), 3);
    for ((status, age, kept), id) in cases.iter().zip(&ids) {
        assert_eq!(
            jobs::get(&mut conn, id).unwrap().is_some(),
            *kept,
            "{status:?} finished {age:?} hours ago"
        );
    }
    assert_eq!(
        jobs::prune(&mut conn, retention, now).unwrap(),
        0,
        "nothing more to prune"
    );

    // A retried dead job is history no more: it stays however old its first run was.
    let old_dead = &ids[2];
    jobs::retry(
        &mut conn,
        old_dead,
        &Actor::System,
        &RequestMeta::system(),
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(jobs::prune(&mut conn, retention, now + 1000 * HOUR).unwrap(), 2);
    assert!(jobs::get(&mut conn, old_dead).unwrap().is_some());
}

fn scope(db: &Db, slug: &str) -> TenantScope {
    let meta = RequestMeta::system();
    let mut conn = db.get_blocking().unwrap();
    let user = mamba_panel::users::create(
        &mut conn,
        mamba_panel::users::NewUser {
            email: format!("{slug}@example.com"),
            display_name: slug.into(),
            password_hash: "not-a-real-hash".into(),
            email_verified: true,
            is_super_admin: false,
        },
        &Actor::System,
        &meta,
    )
    .unwrap();
    let tenant = mamba_panel::tenants::create(&mut conn, &user.id, slug, slug, &meta).unwrap();
    let row = mamba_panel::users::find(&mut conn, &user.id).unwrap().unwrap();
    authz::authorize(
        &mut conn,
        &row,
        Actor::User(user.id.clone()),
        tenant.id.as_str(),
        None,
    )
    .unwrap()
}

async fn a_server_s_jobs_are_visible_to_its_tenant_only(t: TestDb) {
    let (mine, theirs) = (scope(&t.db, "mine"), scope(&t.db, "theirs"));
    let server = ServerId::generate();
    let mut conn = t.db.get_blocking().unwrap();
    let a = jobs::enqueue(
        &mut conn,
        Some(mine.tenant()),
        Some(&server),
        JobKind::ServerInstall,
        &json!({}),
    )
    .unwrap();
    let b = jobs::enqueue(
        &mut conn,
        Some(mine.tenant()),
        Some(&server),
        JobKind::ServerPower,
        &json!({"action": "stop"}),
    )
    .unwrap();
    drop(conn);
    claim(&t.db, "w", Duration::from_secs(60)).unwrap();
    let mut conn = t.db.get_blocking().unwrap();
    let seen = jobs::for_server(&mut conn, &mine, &server, 10).unwrap();
    assert_eq!(
        seen.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        vec![b, a],
        "newest first"
    );
    assert!(
        seen.iter().all(|j| j.lease_owner.is_none()),
        "the worker's host is not shown to tenants"
    );
    assert!(
        jobs::for_server(&mut conn, &theirs, &server, 10)
            .unwrap()
            .is_empty()
    );
    let by_kind: HashMap<_, _> = seen.iter().map(|j| (j.kind, j.status)).collect();
    assert_eq!(by_kind[&JobKind::ServerInstall], JobStatus::Running);
}

async fn operators_list_and_retry_jobs_over_the_api(t: TestDb) {
    use actix_web::http::StatusCode;
    const IP: &str = "198.51.100.70";
    const PASSWORD: &str = "jobs admin test passphrase";
    let svc = actix_web::test::init_service(mamba_panel::http::app(t.state(), common::metrics())).await;
    let admin = common::login_new_user(&svc, &t, "root@example.com", PASSWORD, true, IP).await;
    let user = common::login_new_user(&svc, &t, "user@example.com", PASSWORD, false, IP).await;
    let server = ServerId::generate();
    let dead = enqueue(&t.db, Some(&server), JobKind::ServerInstall);
    let queued = enqueue(&t.db, None, JobKind::ServerPower);
    let job = claim(&t.db, "w", Duration::from_secs(60)).unwrap();
    assert_eq!(job.id, dead);
    let mut conn = t.db.get_blocking().unwrap();
    assert_eq!(
        jobs::fail(&mut conn, &dead, "w", "boom", None, true).unwrap(),
        Outcome::Dead
    );
    drop(conn);
    let get = |uri: &str, bearer: &str| {
        common::get(uri, IP)
            .insert_header(("authorization", bearer.to_string()))
            .to_request()
    };
    let post = |uri: &str, bearer: &str| {
        actix_web::test::TestRequest::post()
            .uri(uri)
            .peer_addr(common::peer(IP))
            .insert_header(("authorization", bearer.to_string()))
            .to_request()
    };

    let a = common::send(&svc, get("/api/v1/admin/jobs?status=dead", &admin)).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let items = a.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], dead.as_str());
    assert_eq!(items[0]["kind"], "server_install");
    assert_eq!(items[0]["last_error"], "boom");
    let a = common::send(&svc, get(&format!("/api/v1/admin/jobs?server={server}"), &admin)).await;
    assert_eq!(a.body["items"].as_array().unwrap().len(), 1);
    let a = common::send(&svc, get("/api/v1/admin/jobs?kind=server_power&limit=1", &admin)).await;
    assert_eq!(a.body["items"][0]["id"], queued.as_str());
    let a = common::send(&svc, get("/api/v1/admin/jobs?status=sleeping", &admin)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    let a = common::send(&svc, get("/api/v1/admin/jobs?limit=0", &admin)).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{a:?}");
    let a = common::send(&svc, get("/api/v1/admin/jobs", &user)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");

    let a = common::send(&svc, post(&format!("/api/v1/admin/jobs/{dead}/retry"), &user)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    let a = common::send(&svc, post(&format!("/api/v1/admin/jobs/{dead}/retry"), &admin)).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["status"], "queued");
    assert_eq!(a.body["attempts"], 0);
    let a = common::send(&svc, post(&format!("/api/v1/admin/jobs/{queued}/retry"), &admin)).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{a:?}");
    assert_eq!(a.body["error"]["code"], "job_not_retryable");
    let a = common::send(&svc, post("/api/v1/admin/jobs/not-an-id/retry", &admin)).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");
    assert_eq!(get_job_status(&t.db, &dead), JobStatus::Queued);
}

fn get_job_status(db: &Db, id: &JobId) -> JobStatus {
    get(db, id).status
}
