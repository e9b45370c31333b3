#![allow(clippy::unwrap_used)]

use abi_stable::std_types::{RNone, RSome, RStr, RVec};
use shmesh_engine_abi::{CallInfo, PluginEngine, Verdict, codes};

use super::{Quota, new_engine};

fn call(uid: u32, method: u32) -> CallInfo<'static> {
    CallInfo {
        uid,
        method,
        ..CallInfo::example()
    }
}

fn admit(engine: &Quota, call: &CallInfo<'_>) -> Verdict {
    engine.admit(call, &mut RVec::new())
}

fn refused(verdict: &Verdict) -> bool {
    matches!(verdict, Verdict::Reject { code, .. } if *code == codes::RESOURCE_EXHAUSTED)
}

#[test]
fn each_caller_has_its_quota_per_method() {
    let quota = Quota::new(
        "default_calls = 2\nmethods = [{ method = 9, calls = 1 }]",
        None,
    )
    .unwrap();
    for _ in 0..2 {
        assert_eq!(admit(&quota, &call(1, 1)), Verdict::Pass);
    }
    let third = admit(&quota, &call(1, 1));
    assert!(refused(&third), "{third:?}");
    let Verdict::Reject { message, .. } = third else {
        unreachable!()
    };
    assert!(message.contains("the 2 calls of method 1"), "{message}");
    // Another caller, another method: their own quotas.
    assert_eq!(admit(&quota, &call(2, 1)), Verdict::Pass);
    assert_eq!(admit(&quota, &call(1, 9)), Verdict::Pass);
    assert!(refused(&admit(&quota, &call(1, 9))));
}

#[test]
fn a_failed_call_is_given_back() {
    let quota = Quota::new("default_calls = 1", None).unwrap();
    let mut notes = RVec::new();
    assert_eq!(quota.admit(&call(1, 1), &mut notes), Verdict::Pass);
    assert_eq!(notes[0].value.as_str(), "1/1");
    quota.done(&call(1, 1), codes::UNAVAILABLE, 10);
    assert_eq!(admit(&quota, &call(1, 1)), Verdict::Pass);
    quota.done(&call(1, 1), 0, 10);
    assert!(refused(&admit(&quota, &call(1, 1))));
}

#[test]
fn per_service_quotas_are_shared_by_callers() {
    let quota = Quota::new("per = \"service\"\ndefault_calls = 1", None).unwrap();
    assert_eq!(admit(&quota, &call(1, 1)), Verdict::Pass);
    assert!(refused(&admit(&quota, &call(2, 1))));
}

#[test]
fn the_counts_survive_a_replacement_with_new_limits() {
    let old = Quota::new("default_calls = 2", None).unwrap();
    admit(&old, &call(1, 1));
    admit(&old, &call(1, 1));
    assert!(refused(&admit(&old, &call(1, 1))));
    let state = old.decompose();
    let new = Quota::new("default_calls = 3", Some(state.as_slice())).unwrap();
    assert_eq!(admit(&new, &call(1, 1)), Verdict::Pass);
    assert!(refused(&admit(&new, &call(1, 1))));
    assert!(
        new.describe().contains("3 calls admitted, 2 over quota"),
        "{}",
        new.describe()
    );
}

#[test]
fn bad_config_and_state_are_refused_with_reasons() {
    let err = |config: &str, state: Option<&[u8]>| Quota::new(config, state).err().unwrap();
    assert!(err("", None).contains("nothing to limit"));
    assert!(err("default_calls = 1\nspeed = 2", None).contains("speed"));
    assert!(err("default_calls = 1\nperiod_s = 0", None).contains("period_s"));
    assert!(err("default_calls = 1", Some(&[])).contains("empty"));
    assert!(err("default_calls = 1", Some(&[7, 0])).contains("format 7"));
    // Through the exported constructor, as the daemon calls it.
    let refused = new_engine(RStr::from_str("default_calls = -1"), RNone);
    assert!(refused.is_err());
    let built = new_engine(
        RStr::from_str("default_calls = 1"),
        RSome([1u8, 0, 0, 0, 0][..].into()),
    );
    assert!(built.is_ok());
}
