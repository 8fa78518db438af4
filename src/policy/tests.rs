//! The policy, exhaustively: every rung, cooldown, hysteresis, unhealthy marking, the hard
//! limit mid-step, pressure victims, idle culling and dry run, with made-up samples and
//! times (no clock, no processes).

use super::*;

const MIB: u64 = 1024 * 1024;

fn config() -> PolicyConfig {
    PolicyConfig {
        soft_limit_bytes: Some(100 * MIB),
        hard_limit_bytes: Some(200 * MIB),
        cooldown: Duration::from_secs(30),
        max_actions: 3,
        action_window: Duration::from_secs(600),
        ..PolicyConfig::default()
    }
}

fn session(id: &str, private_mib: u64) -> SessionSample {
    SessionSample {
        session_id: id.to_string(),
        worker_pid: 1000,
        private_bytes: private_mib * MIB,
        policy: config().effective(SessionPolicy::default()),
        runs_in_flight: 0,
        idle_for: Duration::ZERO,
        ready: true,
        gpu: Vec::new(),
    }
}

fn observe(sessions: Vec<SessionSample>) -> Observation {
    Observation {
        sessions,
        system: SystemSample {
            available_bytes: 20_000 * MIB,
            psi_some_avg10: Some(0.0),
        },
        gpus: Vec::new(),
    }
}

/// Decides, records every action as taken, returns the actions.
fn tick(
    observation: &Observation,
    config: &PolicyConfig,
    state: &mut PolicyState,
    now: Instant,
) -> Vec<Action> {
    let actions = decide(observation, config, state, now);
    for action in &actions {
        state.record(action, now);
    }
    actions
}

fn kinds(actions: &[Action]) -> Vec<ActionKind> {
    actions.iter().map(|a| a.kind).collect()
}

#[test]
fn under_the_soft_limit_nothing_happens() {
    let mut state = PolicyState::default();
    let actions = tick(
        &observe(vec![session("a", 99)]),
        &config(),
        &mut state,
        Instant::now(),
    );
    assert!(actions.is_empty());
}

#[test]
fn the_ladder_goes_gentle_then_recycle() {
    let config = config();
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    let first = tick(&observe(vec![session("a", 150)]), &config, &mut state, t0);
    assert_eq!(
        kinds(&first),
        [ActionKind::Gentle(GentleAction::PurgeVariables)]
    );
    assert_eq!(first[0].trigger, Trigger::SoftLimit);
    assert_eq!(first[0].rung, 1);
    assert!(first[0].reason.contains("150.0 MiB") && first[0].reason.contains("100.0 MiB"));

    // Re-measured right after: still over → escalate at once, cooldown notwithstanding.
    let second = tick(&observe(vec![session("a", 140)]), &config, &mut state, t0);
    assert_eq!(
        kinds(&second),
        [ActionKind::Recycle {
            preserve_variables: false
        }]
    );
    assert_eq!(second[0].rung, 2);

    // Recycled and back under: nothing.
    let third = tick(&observe(vec![session("a", 30)]), &config, &mut state, t0);
    assert!(third.is_empty());
}

#[test]
fn the_session_policy_picks_the_gentle_action_and_variable_preservation() {
    let config = config();
    let mut sample = session("a", 150);
    sample.policy = config.effective(SessionPolicy {
        gentle_action: Some(GentleAction::ResetGraph),
        preserve_variables: true,
        ..SessionPolicy::default()
    });
    let mut state = PolicyState::default();
    let now = Instant::now();
    let first = tick(&observe(vec![sample.clone()]), &config, &mut state, now);
    assert_eq!(
        kinds(&first),
        [ActionKind::Gentle(GentleAction::ResetGraph)]
    );
    let second = tick(&observe(vec![sample]), &config, &mut state, now);
    assert_eq!(
        kinds(&second),
        [ActionKind::Recycle {
            preserve_variables: true
        }]
    );
}

#[test]
fn a_success_that_does_not_rearm_escalates_next_time() {
    // Hysteresis: after the gentle action memory is at 95 MiB, under the limit but above
    // 0.9 × 100 MiB. Crossing again then goes straight to a recycle.
    let config = config();
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    tick(&observe(vec![session("a", 150)]), &config, &mut state, t0);
    assert!(tick(&observe(vec![session("a", 95)]), &config, &mut state, t0).is_empty());
    let again = tick(
        &observe(vec![session("a", 120)]),
        &config,
        &mut state,
        t0 + Duration::from_secs(1),
    );
    assert_eq!(again[0].rung, 2);
}

#[test]
fn a_rearmed_session_inside_the_cooldown_waits() {
    let config = config();
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    tick(&observe(vec![session("a", 150)]), &config, &mut state, t0);
    // Well under: re-armed.
    assert!(tick(&observe(vec![session("a", 50)]), &config, &mut state, t0).is_empty());
    // Over again 10 s later: inside the 30 s cooldown, so no action.
    let t1 = t0 + Duration::from_secs(10);
    assert!(tick(&observe(vec![session("a", 150)]), &config, &mut state, t1).is_empty());
    // After the cooldown: the gentle rung again.
    let t2 = t0 + Duration::from_secs(31);
    let late = tick(&observe(vec![session("a", 150)]), &config, &mut state, t2);
    assert_eq!(
        kinds(&late),
        [ActionKind::Gentle(GentleAction::PurgeVariables)]
    );
}

#[test]
fn after_a_recycle_another_waits_for_the_cooldown() {
    let config = config();
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    tick(&observe(vec![session("a", 150)]), &config, &mut state, t0);
    tick(&observe(vec![session("a", 150)]), &config, &mut state, t0); // recycle
    assert!(tick(&observe(vec![session("a", 150)]), &config, &mut state, t0).is_empty());
    let later = t0 + Duration::from_secs(31);
    let again = tick(
        &observe(vec![session("a", 150)]),
        &config,
        &mut state,
        later,
    );
    assert_eq!(again[0].rung, 2);
}

#[test]
fn too_many_actions_mark_the_session_unhealthy_once() {
    let config = config(); // max 3 actions per 600 s
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    let mut taken = Vec::new();
    for second in [0, 0, 31, 62, 93] {
        let now = t0 + Duration::from_secs(second);
        taken.extend(tick(
            &observe(vec![session("a", 150)]),
            &config,
            &mut state,
            now,
        ));
    }
    assert_eq!(
        kinds(&taken),
        [
            ActionKind::Gentle(GentleAction::PurgeVariables),
            ActionKind::Recycle {
                preserve_variables: false
            },
            ActionKind::Recycle {
                preserve_variables: false
            },
            ActionKind::MarkUnhealthy,
        ]
    );
    assert!(state.sessions["a"].unhealthy);
    // No more soft-limit actions…
    let quiet = tick(
        &observe(vec![session("a", 150)]),
        &config,
        &mut state,
        t0 + Duration::from_secs(200),
    );
    assert!(quiet.is_empty());
    // …but the hard limit still holds.
    let hard = tick(
        &observe(vec![session("a", 250)]),
        &config,
        &mut state,
        t0 + Duration::from_secs(201),
    );
    assert_eq!(hard[0].trigger, Trigger::HardLimit);
}

#[test]
fn old_actions_leave_the_window() {
    let config = config();
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    for second in [0, 0, 31] {
        tick(
            &observe(vec![session("a", 150)]),
            &config,
            &mut state,
            t0 + Duration::from_secs(second),
        );
    }
    // Ten minutes later the three actions are out of the window: recycle, not unhealthy.
    let later = tick(
        &observe(vec![session("a", 150)]),
        &config,
        &mut state,
        t0 + Duration::from_secs(700),
    );
    assert_eq!(later[0].rung, 2);
    assert!(!state.sessions["a"].unhealthy);
}

#[test]
fn soft_actions_wait_for_the_gap_between_steps() {
    let mut busy = session("a", 150);
    busy.runs_in_flight = 1;
    let mut state = PolicyState::default();
    assert!(tick(&observe(vec![busy]), &config(), &mut state, Instant::now()).is_empty());
}

#[test]
fn the_hard_limit_acts_at_once_killing_a_running_step() {
    let config = config();
    let mut state = PolicyState::default();
    let mut busy = session("a", 250);
    busy.runs_in_flight = 2;
    let actions = tick(&observe(vec![busy]), &config, &mut state, Instant::now());
    assert_eq!(kinds(&actions), [ActionKind::KillAndRestore]);
    assert_eq!(actions[0].trigger, Trigger::HardLimit);
    assert_eq!(actions[0].rung, 3);
    assert!(actions[0].reason.contains("250.0 MiB") && actions[0].reason.contains("200.0 MiB"));

    // Between steps the hard limit recycles (keeping variables if the session asked).
    let mut idle = session("b", 250);
    idle.policy.preserve_variables = true;
    let actions = tick(&observe(vec![idle]), &config, &mut state, Instant::now());
    assert_eq!(
        kinds(&actions),
        [ActionKind::Recycle {
            preserve_variables: true
        }]
    );
}

#[test]
fn session_limits_are_clamped_by_the_operator_maxima() {
    let config = PolicyConfig {
        max_soft_limit_bytes: Some(500 * MIB),
        max_hard_limit_bytes: Some(800 * MIB),
        ..config()
    };
    let asked = config.effective(SessionPolicy {
        soft_limit_bytes: Some(10_000 * MIB),
        hard_limit_bytes: Some(300 * MIB),
        ..SessionPolicy::default()
    });
    assert_eq!(asked.soft_limit_bytes, Some(500 * MIB));
    assert_eq!(asked.hard_limit_bytes, Some(300 * MIB));
    let defaults = config.effective(SessionPolicy::default());
    assert_eq!(defaults.soft_limit_bytes, Some(100 * MIB));
    assert_eq!(defaults.gentle_action, Some(GentleAction::PurgeVariables));
}

#[test]
fn sessions_that_are_restoring_are_left_alone() {
    let mut restoring = session("a", 500);
    restoring.ready = false;
    let mut state = PolicyState::default();
    assert!(
        tick(
            &observe(vec![restoring]),
            &config(),
            &mut state,
            Instant::now()
        )
        .is_empty()
    );
}

fn pressure_config() -> PolicyConfig {
    PolicyConfig {
        soft_limit_bytes: None,
        hard_limit_bytes: None,
        pressure: PressureConfig {
            min_available_bytes: Some(1024 * MIB),
            psi_some_avg10: Some(20.0),
            psi_duration: Duration::from_secs(10),
            min_gpu_free_bytes: None,
        },
        ..config()
    }
}

/// A session without limits of its own, as the pressure tests want.
fn unlimited(id: &str, private_mib: u64) -> SessionSample {
    SessionSample {
        policy: pressure_config().effective(SessionPolicy::default()),
        ..session(id, private_mib)
    }
}

fn under_pressure(sessions: Vec<SessionSample>) -> Observation {
    Observation {
        sessions,
        system: SystemSample {
            available_bytes: 512 * MIB,
            psi_some_avg10: None,
        },
        gpus: Vec::new(),
    }
}

#[test]
fn pressure_takes_one_victim_per_tick_in_a_careful_order() {
    let config = pressure_config();
    let mut over_budget = unlimited("over-budget", 300);
    over_budget.policy.soft_limit_bytes = Some(200 * MIB);
    let mut long_idle = unlimited("long-idle", 50);
    long_idle.idle_for = Duration::from_secs(600);
    let mut big_running = unlimited("big-running", 5000);
    big_running.runs_in_flight = 1;
    let mut big_idle = unlimited("big-idle", 900);
    big_idle.idle_for = Duration::from_secs(5);
    let mut small_idle = unlimited("small-idle", 100);
    small_idle.idle_for = Duration::from_secs(5);
    let all = vec![big_running, small_idle, long_idle, big_idle, over_budget];

    let mut state = PolicyState::default();
    let t0 = Instant::now();
    let mut order = Vec::new();
    for _ in 0..6 {
        let actions = tick(&under_pressure(all.clone()), &config, &mut state, t0);
        assert_eq!(actions.len(), 1, "one action at a time");
        order.push((actions[0].session_id.clone(), actions[0].trigger));
    }
    // The session over its own budget goes first, through its own ladder (gentle, then
    // recycle); then pressure victims: idle before running, longest idle, then largest.
    let expected = [
        ("over-budget", Trigger::SoftLimit),
        ("over-budget", Trigger::SoftLimit),
        ("long-idle", Trigger::SystemPressure),
        ("big-idle", Trigger::SystemPressure),
        ("small-idle", Trigger::SystemPressure),
        ("big-running", Trigger::SystemPressure),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(id, trigger)| (id.to_string(), *trigger))
        .collect();
    assert_eq!(order, expected);
    // Everyone was just acted on: nothing left to take until the cooldown passes.
    assert!(tick(&under_pressure(all), &config, &mut state, t0).is_empty());
}

#[test]
fn pressure_stops_when_it_clears() {
    let config = pressure_config();
    let mut state = PolicyState::default();
    let calm = Observation {
        sessions: vec![unlimited("a", 900)],
        system: SystemSample {
            available_bytes: 4096 * MIB,
            psi_some_avg10: Some(1.0),
        },
        gpus: Vec::new(),
    };
    assert!(tick(&calm, &config, &mut state, Instant::now()).is_empty());
}

#[test]
fn psi_must_stay_high_for_its_duration() {
    let config = pressure_config();
    let mut state = PolicyState::default();
    let high = |psi| Observation {
        sessions: vec![unlimited("a", 900)],
        system: SystemSample {
            available_bytes: 4096 * MIB,
            psi_some_avg10: Some(psi),
        },
        gpus: Vec::new(),
    };
    let t0 = Instant::now();
    assert!(tick(&high(50.0), &config, &mut state, t0).is_empty());
    assert!(
        tick(
            &high(50.0),
            &config,
            &mut state,
            t0 + Duration::from_secs(5)
        )
        .is_empty()
    );
    // A dip resets the clock.
    assert!(tick(&high(5.0), &config, &mut state, t0 + Duration::from_secs(6)).is_empty());
    assert!(
        tick(
            &high(50.0),
            &config,
            &mut state,
            t0 + Duration::from_secs(7)
        )
        .is_empty()
    );
    let acted = tick(
        &high(50.0),
        &config,
        &mut state,
        t0 + Duration::from_secs(17),
    );
    assert_eq!(acted.len(), 1);
    assert!(acted[0].reason.contains("PSI"), "{}", acted[0].reason);
}

#[test]
fn idle_sessions_are_culled_once_per_idle_period() {
    let config = PolicyConfig {
        idle_timeout: Some(Duration::from_secs(60)),
        idle_action: IdleAction::Recycle,
        ..config()
    };
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    let mut idle = session("a", 50);
    idle.idle_for = Duration::from_secs(61);
    let first = tick(&observe(vec![idle.clone()]), &config, &mut state, t0);
    assert_eq!(first[0].trigger, Trigger::Idle);
    assert!(matches!(first[0].kind, ActionKind::Recycle { .. }));
    // Still idle: already handled.
    assert!(tick(&observe(vec![idle.clone()]), &config, &mut state, t0).is_empty());
    // Used, then idle again: culled again.
    let mut used = idle.clone();
    used.idle_for = Duration::from_secs(1);
    tick(&observe(vec![used]), &config, &mut state, t0);
    let again = tick(&observe(vec![idle]), &config, &mut state, t0);
    assert_eq!(again.len(), 1);

    let closing = PolicyConfig {
        idle_action: IdleAction::Close,
        ..config
    };
    let mut idle = session("b", 50);
    idle.idle_for = Duration::from_secs(61);
    let closed = tick(
        &observe(vec![idle]),
        &closing,
        &mut PolicyState::default(),
        t0,
    );
    assert_eq!(kinds(&closed), [ActionKind::Close]);
}

#[test]
fn a_running_session_is_never_idle_culled() {
    let config = PolicyConfig {
        idle_timeout: Some(Duration::from_secs(60)),
        ..config()
    };
    let mut busy = session("a", 50);
    busy.idle_for = Duration::from_secs(3600);
    busy.runs_in_flight = 1;
    assert!(
        tick(
            &observe(vec![busy]),
            &config,
            &mut PolicyState::default(),
            Instant::now()
        )
        .is_empty()
    );
}

#[test]
fn dry_run_decides_the_same_and_marks_every_action() {
    let live = config();
    let dry = PolicyConfig {
        dry_run: true,
        ..config()
    };
    let observation = observe(vec![session("a", 150), session("b", 250)]);
    let now = Instant::now();
    let real = decide(&observation, &live, &mut PolicyState::default(), now);
    let reported = decide(&observation, &dry, &mut PolicyState::default(), now);
    assert_eq!(kinds(&real), kinds(&reported));
    assert!(reported.iter().all(|action| action.dry_run));
    assert!(real.iter().all(|action| !action.dry_run));
}

#[test]
fn closed_sessions_are_forgotten() {
    let config = config();
    let mut state = PolicyState::default();
    let now = Instant::now();
    tick(&observe(vec![session("a", 150)]), &config, &mut state, now);
    assert!(state.sessions.contains_key("a"));
    tick(&observe(vec![]), &config, &mut state, now);
    assert!(state.sessions.is_empty());
}

// GPU rules (policy/gpu.rs).

const GIB: u64 = 1024 * MIB;

fn gpu_config() -> PolicyConfig {
    PolicyConfig {
        soft_limit_bytes: Some(1000 * MIB),
        hard_limit_bytes: Some(2000 * MIB),
        gpu_soft_limit_bytes: Some(4 * GIB),
        gpu_hard_limit_bytes: Some(8 * GIB),
        ..config()
    }
}

/// A session at `private_mib` of host memory holding `gpu` (device, GiB).
fn on_gpu(id: &str, private_mib: u64, gpu: &[(u32, u64)]) -> SessionSample {
    SessionSample {
        policy: gpu_config().effective(SessionPolicy::default()),
        gpu: gpu
            .iter()
            .map(|&(gpu, gib)| crate::gpu::GpuUsage {
                gpu,
                used_bytes: gib * GIB,
            })
            .collect(),
        ..session(id, private_mib)
    }
}

#[test]
fn gpu_limits_are_off_by_default_and_no_gpu_means_no_gpu_action() {
    let mut state = PolicyState::default();
    // Without GPU limits, any amount of GPU memory is left alone.
    let mut huge = on_gpu("a", 10, &[(0, 100)]);
    huge.policy = config().effective(SessionPolicy::default());
    assert!(tick(&observe(vec![huge]), &config(), &mut state, Instant::now()).is_empty());
    // With limits but no GPU memory (a host without GPUs): nothing either.
    let none = on_gpu("b", 10, &[]);
    assert!(
        tick(
            &observe(vec![none]),
            &gpu_config(),
            &mut state,
            Instant::now()
        )
        .is_empty()
    );
}

#[test]
fn over_the_gpu_hard_limit_recycles_at_once_and_says_why() {
    let mut state = PolicyState::default();
    // 5 + 4 GiB on two devices: the sum is what the limit holds.
    let sample = on_gpu("a", 10, &[(0, 5), (1, 4)]);
    let actions = tick(
        &observe(vec![sample.clone()]),
        &gpu_config(),
        &mut state,
        Instant::now(),
    );
    assert_eq!(
        kinds(&actions),
        [ActionKind::Recycle {
            preserve_variables: false
        }]
    );
    let action = &actions[0];
    assert_eq!(action.trigger, Trigger::GpuHardLimit);
    assert_eq!(action.trigger.as_str(), "gpu_hard_limit");
    assert_eq!(action.rung, 3);
    assert!(
        action.reason.contains("GPU hard limit 8192.0 MiB"),
        "{}",
        action.reason
    );
    assert!(
        action.reason.contains("GPU 0 5120.0 MiB, GPU 1 4096.0 MiB"),
        "{}",
        action.reason
    );
    assert!(
        action.reason.contains("a reset cannot return GPU memory"),
        "{}",
        action.reason
    );
    // No gentle rung first, even for a session that asked for one, and even when it is
    // unhealthy (the hard limit always holds).
    let mut unhealthy = PolicyState::default();
    unhealthy.sessions.insert(
        "a".to_string(),
        SessionHistory {
            unhealthy: true,
            ..SessionHistory::default()
        },
    );
    let actions = tick(
        &observe(vec![sample]),
        &gpu_config(),
        &mut unhealthy,
        Instant::now(),
    );
    assert_eq!(actions[0].trigger, Trigger::GpuHardLimit);
}

#[test]
fn over_the_gpu_hard_limit_mid_step_kills_under_the_step() {
    let mut sample = on_gpu("a", 10, &[(0, 9)]);
    sample.runs_in_flight = 1;
    let mut state = PolicyState::default();
    let actions = tick(
        &observe(vec![sample.clone()]),
        &gpu_config(),
        &mut state,
        Instant::now(),
    );
    assert_eq!(kinds(&actions), [ActionKind::KillAndRestore]);
    assert_eq!(actions[0].trigger, Trigger::GpuHardLimit);
    // The runner's kill for a session that already has an action in flight sees it too.
    let kill = hard_limit_kill(&sample, &gpu_config()).expect("a kill");
    assert_eq!(kill.trigger, Trigger::GpuHardLimit);
    // Between steps, hard_limit_kill has nothing to add (decide recycles).
    sample.runs_in_flight = 0;
    assert_eq!(hard_limit_kill(&sample, &gpu_config()), None);
}

#[test]
fn the_host_hard_limit_comes_before_the_gpu_one() {
    let sample = on_gpu("a", 2500, &[(0, 9)]);
    let mut state = PolicyState::default();
    let actions = tick(
        &observe(vec![sample]),
        &gpu_config(),
        &mut state,
        Instant::now(),
    );
    assert_eq!(actions[0].trigger, Trigger::HardLimit);
}

#[test]
fn over_the_gpu_soft_limit_recycles_between_steps_once_per_cooldown() {
    let config = gpu_config();
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    let mut sample = on_gpu("a", 10, &[(0, 5)]);
    // A step runs: the soft limit waits for the gap between steps.
    sample.runs_in_flight = 1;
    assert!(tick(&observe(vec![sample.clone()]), &config, &mut state, t0).is_empty());
    sample.runs_in_flight = 0;
    let actions = tick(&observe(vec![sample.clone()]), &config, &mut state, t0);
    assert_eq!(
        kinds(&actions),
        [ActionKind::Recycle {
            preserve_variables: false
        }],
        "straight to a recycle: no gentle rung for GPU memory"
    );
    assert_eq!(actions[0].trigger, Trigger::GpuSoftLimit);
    assert_eq!(actions[0].rung, 2);
    assert!(
        actions[0].reason.contains("GPU soft limit"),
        "{}",
        actions[0].reason
    );
    // Still over within the cooldown: wait; after it: recycle again.
    let later = t0 + Duration::from_secs(10);
    assert!(tick(&observe(vec![sample.clone()]), &config, &mut state, later).is_empty());
    let after = t0 + Duration::from_secs(31);
    let actions = tick(&observe(vec![sample.clone()]), &config, &mut state, after);
    assert_eq!(actions[0].trigger, Trigger::GpuSoftLimit);
    // The session's own preference for variables is honoured.
    let mut preserving = on_gpu("b", 10, &[(0, 5)]);
    preserving.policy.preserve_variables = true;
    let actions = tick(
        &observe(vec![preserving]),
        &config,
        &mut PolicyState::default(),
        t0,
    );
    assert_eq!(
        kinds(&actions),
        [ActionKind::Recycle {
            preserve_variables: true
        }]
    );
}

#[test]
fn gpu_soft_limit_actions_count_toward_unhealthy() {
    let config = gpu_config();
    let mut state = PolicyState::default();
    let sample = on_gpu("a", 10, &[(0, 5)]);
    let t0 = Instant::now();
    let mut triggers = Vec::new();
    for step in 0..5 {
        let now = t0 + Duration::from_secs(31 * step);
        for action in tick(&observe(vec![sample.clone()]), &config, &mut state, now) {
            triggers.push(action.kind);
        }
    }
    let recycle = ActionKind::Recycle {
        preserve_variables: false,
    };
    assert_eq!(
        triggers,
        [recycle, recycle, recycle, ActionKind::MarkUnhealthy],
        "max_actions = 3, then reported and left alone"
    );
}

#[test]
fn a_session_asks_for_its_own_gpu_limits_within_the_maxima() {
    let config = PolicyConfig {
        max_gpu_hard_limit_bytes: Some(16 * GIB),
        ..gpu_config()
    };
    let policy = config.effective(SessionPolicy {
        gpu_soft_limit_bytes: Some(GIB),
        gpu_hard_limit_bytes: Some(100 * GIB),
        ..SessionPolicy::default()
    });
    assert_eq!(policy.gpu_soft_limit_bytes, Some(GIB));
    assert_eq!(policy.gpu_hard_limit_bytes, Some(16 * GIB));
    // A restored session (the store keeps no GPU limits) gets the configured defaults.
    let restored = config.with_gpu_defaults(SessionPolicy {
        soft_limit_bytes: Some(5),
        ..SessionPolicy::default()
    });
    assert_eq!(restored.soft_limit_bytes, Some(5));
    assert_eq!(restored.gpu_hard_limit_bytes, Some(8 * GIB));
}

fn gpu_pressure_config() -> PolicyConfig {
    let mut config = pressure_config();
    config.pressure.min_available_bytes = None;
    config.pressure.psi_some_avg10 = None;
    config.pressure.min_gpu_free_bytes = Some(2 * GIB);
    config
}

fn gpus(free_gib: &[(u32, u64)]) -> Vec<GpuDeviceSample> {
    free_gib
        .iter()
        .map(|&(gpu, free)| GpuDeviceSample {
            gpu,
            free_bytes: free * GIB,
            total_bytes: 80 * GIB,
        })
        .collect()
}

#[test]
fn gpu_pressure_takes_victims_among_the_sessions_on_that_device() {
    let config = gpu_pressure_config();
    let unlimited_on = |id: &str, gpu: &[(u32, u64)]| SessionSample {
        policy: config.effective(SessionPolicy::default()),
        ..on_gpu(id, 10, gpu)
    };
    let mut over_budget = unlimited_on("over-budget", &[(1, 3)]);
    over_budget.policy.gpu_soft_limit_bytes = Some(2 * GIB);
    let mut long_idle = unlimited_on("long-idle", &[(1, 1)]);
    long_idle.idle_for = Duration::from_secs(600);
    let mut big_running = unlimited_on("big-running", &[(1, 50)]);
    big_running.runs_in_flight = 1;
    let big_idle = unlimited_on("big-idle", &[(1, 20), (0, 1)]);
    let small_idle = unlimited_on("small-idle", &[(1, 2)]);
    // Holds nothing on device 1: never a victim of its pressure.
    let elsewhere = unlimited_on("elsewhere", &[(0, 70)]);
    let all = vec![
        elsewhere,
        big_running,
        small_idle,
        long_idle,
        big_idle,
        over_budget,
    ];
    let observation = Observation {
        gpus: gpus(&[(0, 9), (1, 1)]),
        ..observe(all.clone())
    };
    let mut state = PolicyState::default();
    let t0 = Instant::now();
    let mut order = Vec::new();
    for _ in 0..5 {
        let actions = tick(&observation, &config, &mut state, t0);
        assert_eq!(actions.len(), 1, "one victim per tick");
        if actions[0].trigger == Trigger::GpuPressure {
            assert!(
                actions[0].reason.contains("GPU 1 has 1024.0 MiB free"),
                "{}",
                actions[0].reason
            );
        }
        order.push((actions[0].session_id.clone(), actions[0].trigger));
    }
    // The session over its own GPU budget goes first, through its own limit; then idle
    // before running, the longest idle, then the largest on the device.
    let expected: Vec<_> = [
        ("over-budget", Trigger::GpuSoftLimit),
        ("long-idle", Trigger::GpuPressure),
        ("big-idle", Trigger::GpuPressure),
        ("small-idle", Trigger::GpuPressure),
        ("big-running", Trigger::GpuPressure),
    ]
    .iter()
    .map(|(id, trigger)| (id.to_string(), *trigger))
    .collect();
    assert_eq!(order, expected);
    // Everyone on device 1 was just recycled: nothing until the cooldown.
    assert!(tick(&observation, &config, &mut state, t0).is_empty());
}

#[test]
fn gpu_pressure_is_off_without_a_floor_and_quiet_above_it() {
    let sample = on_gpu("a", 10, &[(0, 1)]);
    let short = Observation {
        gpus: gpus(&[(0, 1)]),
        ..observe(vec![sample.clone()])
    };
    let no_floor = PolicyConfig {
        gpu_soft_limit_bytes: None,
        gpu_hard_limit_bytes: None,
        ..config()
    };
    assert!(
        tick(
            &short,
            &no_floor,
            &mut PolicyState::default(),
            Instant::now()
        )
        .is_empty()
    );
    let plenty = Observation {
        gpus: gpus(&[(0, 40)]),
        ..observe(vec![sample])
    };
    assert!(
        tick(
            &plenty,
            &gpu_pressure_config(),
            &mut PolicyState::default(),
            Instant::now()
        )
        .is_empty()
    );
}

#[test]
fn host_pressure_goes_before_gpu_pressure() {
    let mut config = gpu_pressure_config();
    config.pressure.min_available_bytes = Some(1024 * MIB);
    let sample = SessionSample {
        policy: config.effective(SessionPolicy::default()),
        ..on_gpu("a", 10, &[(0, 1)])
    };
    let observation = Observation {
        gpus: gpus(&[(0, 1)]),
        ..under_pressure(vec![sample])
    };
    let actions = tick(
        &observation,
        &config,
        &mut PolicyState::default(),
        Instant::now(),
    );
    assert_eq!(actions[0].trigger, Trigger::SystemPressure);
}

// ---------------------------------------------------------------------------------------
// The runner (`runner.rs`) around `decide`, with sessions made up as above: each action's
// `apply` waits until the test lets it finish, so what runs alongside what is decided by the
// test, not by timing. Waits are for the runner's own steps (observations, actions started),
// each with a deadline.
mod runner {
    use std::sync::{Arc, Mutex};

    use tokio::sync::{Semaphore, mpsc, watch};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::memory::MemoryUsage;

    const DEADLINE: Duration = Duration::from_secs(30);

    /// Made-up sessions: a fixed observation, and an `apply` that reports its start and
    /// then waits for a permit of its session's gate.
    struct MadeUpSessions {
        observation: Mutex<Observation>,
        observations: watch::Sender<usize>,
        started: mpsc::UnboundedSender<Action>,
        gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    }

    impl MadeUpSessions {
        fn gate(&self, session_id: &str) -> Arc<Semaphore> {
            self.gates
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(session_id.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(0)))
                .clone()
        }

        /// Lets one action on `session_id` finish.
        fn finish_one(&self, session_id: &str) {
            self.gate(session_id).add_permits(1);
        }
    }

    impl Supervised for MadeUpSessions {
        fn observe(&self) -> Observation {
            self.observations.send_modify(|count| *count += 1);
            self.observation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }

        async fn apply(
            self: &Arc<Self>,
            action: &Action,
        ) -> crate::error::Result<Option<MemoryUsage>> {
            let _ = self.started.send(action.clone());
            let gate = self.gate(&action.session_id);
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            Ok(None)
        }
    }

    /// The runner over `observation`, ticking every millisecond; its started actions come
    /// through the receiver. The runner stops when the returned token is cancelled.
    fn start(
        observation: Observation,
        config: PolicyConfig,
    ) -> (
        Arc<MadeUpSessions>,
        mpsc::UnboundedReceiver<Action>,
        CancellationToken,
    ) {
        let (sessions, started, shutdown, _runner) = start_joinable(observation, config);
        (sessions, started, shutdown)
    }

    /// `start`, with the runner's task to await.
    fn start_joinable(
        observation: Observation,
        config: PolicyConfig,
    ) -> (
        Arc<MadeUpSessions>,
        mpsc::UnboundedReceiver<Action>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (started, receiver) = mpsc::unbounded_channel();
        let sessions = Arc::new(MadeUpSessions {
            observation: Mutex::new(observation),
            observations: watch::channel(0).0,
            started,
            gates: Mutex::new(HashMap::new()),
        });
        let shutdown = CancellationToken::new();
        let config = PolicyConfig {
            interval: Duration::from_millis(1),
            ..config
        };
        let runner = tokio::spawn(run(sessions.clone(), config, shutdown.clone()));
        (sessions, receiver, shutdown, runner)
    }

    async fn next_started(receiver: &mut mpsc::UnboundedReceiver<Action>) -> Action {
        tokio::time::timeout(DEADLINE, receiver.recv())
            .await
            .expect("no action started")
            .expect("runner gone")
    }

    /// Waits until the runner has observed `more` more times.
    async fn observations_pass(sessions: &MadeUpSessions, more: usize) {
        let mut count = sessions.observations.subscribe();
        let target = *count.borrow() + more;
        tokio::time::timeout(DEADLINE, count.wait_for(|n| *n >= target))
            .await
            .expect("the runner stopped observing")
            .expect("runner gone");
    }

    #[tokio::test]
    async fn a_slow_action_does_not_hold_up_another_sessions_hard_limit() {
        let mut running = session("b", 250);
        running.runs_in_flight = 1;
        let (sessions, mut started, shutdown) =
            start(observe(vec![session("a", 150), running]), config());
        let mut first = vec![
            next_started(&mut started).await,
            next_started(&mut started).await,
        ];
        first.sort_by(|x, y| x.session_id.cmp(&y.session_id));
        // Neither has been let finish: they run at the same time.
        assert_eq!(
            kinds(&first),
            [
                ActionKind::Gentle(GentleAction::PurgeVariables),
                ActionKind::KillAndRestore
            ]
        );
        // The kill finishes while the purge still runs; the loop goes on observing.
        sessions.finish_one("b");
        observations_pass(&sessions, 5).await;
        shutdown.cancel();
        sessions.finish_one("a");
    }

    #[tokio::test]
    async fn a_session_gets_no_second_action_while_its_first_runs() {
        let (sessions, mut started, shutdown) = start(observe(vec![session("a", 150)]), config());
        let gentle = next_started(&mut started).await;
        assert_eq!(
            gentle.kind,
            ActionKind::Gentle(GentleAction::PurgeVariables)
        );
        // Still over its limit in every observation, but its purge has not finished.
        observations_pass(&sessions, 20).await;
        assert!(
            started.try_recv().is_err(),
            "a second action on a busy session"
        );
        // Done and still over: the ladder escalates from the recorded rung.
        sessions.finish_one("a");
        let recycle = next_started(&mut started).await;
        assert_eq!(
            (recycle.kind, recycle.rung),
            (
                ActionKind::Recycle {
                    preserve_variables: false
                },
                2
            )
        );
        shutdown.cancel();
        sessions.finish_one("a");
    }

    #[tokio::test]
    async fn a_step_past_the_hard_limit_is_killed_while_an_action_waits_behind_it() {
        let (sessions, mut started, shutdown) = start(observe(vec![session("a", 150)]), config());
        let gentle = next_started(&mut started).await;
        assert_eq!(
            gentle.kind,
            ActionKind::Gentle(GentleAction::PurgeVariables)
        );
        // The purge waits (for the session's lock) while the client's step grows past the
        // hard limit: the kill must not wait for the purge.
        let mut running = session("a", 250);
        running.runs_in_flight = 1;
        *sessions.observation.lock().expect("observation") = observe(vec![running]);
        let kill = next_started(&mut started).await;
        assert_eq!(
            (kill.kind, kill.rung, kill.trigger),
            (ActionKind::KillAndRestore, 3, Trigger::HardLimit)
        );
        // One kill, not one per observation.
        observations_pass(&sessions, 20).await;
        assert!(started.try_recv().is_err(), "a second kill");
        shutdown.cancel();
        sessions.finish_one("a");
        sessions.finish_one("a");
    }

    #[tokio::test]
    async fn pressure_takes_its_next_victim_only_after_the_first_is_done() {
        let (sessions, mut started, shutdown) = start(
            under_pressure(vec![unlimited("a", 300), unlimited("b", 200)]),
            pressure_config(),
        );
        let first = next_started(&mut started).await;
        assert_eq!(first.trigger, Trigger::SystemPressure);
        observations_pass(&sessions, 20).await;
        assert!(
            started.try_recv().is_err(),
            "a second victim before the first was done"
        );
        sessions.finish_one(&first.session_id);
        let second = next_started(&mut started).await;
        assert_eq!(second.trigger, Trigger::SystemPressure);
        assert_ne!(second.session_id, first.session_id);
        shutdown.cancel();
        sessions.finish_one(&second.session_id);
    }

    #[tokio::test]
    async fn shutdown_lets_started_actions_finish() {
        let (sessions, mut started, shutdown, runner) =
            start_joinable(observe(vec![session("a", 150)]), config());
        next_started(&mut started).await;
        shutdown.cancel();
        // The purge has not been let finish: the runner waits for it, however often it is
        // polled meanwhile.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!runner.is_finished(), "the runner left an action half-done");
        sessions.finish_one("a");
        tokio::time::timeout(DEADLINE, runner)
            .await
            .expect("the runner did not stop")
            .expect("the runner panicked");
    }
}

#[test]
fn a_session_whose_fresh_workers_stay_over_the_gpu_hard_limit_is_closed_not_recycled_forever() {
    let config = gpu_config();
    let sample = on_gpu("a", 10, &[(0, 9)]);
    let mut state = PolicyState::default();
    let now = Instant::now();
    // Every recycle lands in a worker that is over the limit again.
    for tick_number in 0..config.max_actions {
        let actions = tick(
            &observe(vec![sample.clone()]),
            &config,
            &mut state,
            now + Duration::from_secs(tick_number as u64),
        );
        assert_eq!(
            kinds(&actions),
            [ActionKind::Recycle {
                preserve_variables: false
            }],
            "tick {tick_number}"
        );
    }
    let actions = tick(
        &observe(vec![sample]),
        &config,
        &mut state,
        now + Duration::from_secs(config.max_actions as u64),
    );
    assert_eq!(kinds(&actions), [ActionKind::Close]);
    assert_eq!(actions[0].trigger, Trigger::GpuHardLimit);
    assert!(
        actions[0].reason.contains("closing the session"),
        "{}",
        actions[0].reason
    );
}
