//! Access control at grant time: which caller may connect to which service.
//!
//! Rules are checked in order and the first that matches decides; with no
//! match the configured default does. The daemon applies the decision when
//! a client asks for a connection (the direct path has no per-call cost);
//! a denied client is refused with `Denied` naming the rule.
//!
//! ```
//! use shmesh::control::Caller;
//! use shmesh_daemon::access::AccessRules;
//! use shmesh_daemon::config::{AccessConfig, Action, Rule};
//!
//! let rules = AccessRules::new(AccessConfig {
//!     default: Action::Allow,
//!     rules: vec![Rule { action: Action::Deny, service: "billing".into(), uid: None, app: Some("curl".into()) }],
//! });
//! let curl = Caller { pid: 1, uid: 1000, gid: 1000, app: "curl".into() };
//! assert_eq!(rules.decide(&curl, "billing").action, Action::Deny);
//! assert_eq!(rules.decide(&curl, "echo").action, Action::Allow);
//! ```

use shmesh::control::Caller;

use crate::config::{AccessConfig, Action, Rule};

/// The access rules in force.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    config: AccessConfig,
}

/// What the rules say about one caller and service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// The 0-based index of the rule that decided; `None` for the default.
    pub rule: Option<usize>,
}

impl AccessRules {
    /// Rules from the `[access]` table.
    pub fn new(config: AccessConfig) -> Self {
        AccessRules { config }
    }

    /// Decides whether `caller` may connect to `service`.
    pub fn decide(&self, caller: &Caller, service: &str) -> Decision {
        self.config
            .rules
            .iter()
            .position(|rule| matches(rule, caller, service))
            .map_or(
                Decision {
                    action: self.config.default,
                    rule: None,
                },
                |i| Decision {
                    action: self.config.rules[i].action,
                    rule: Some(i),
                },
            )
    }

    /// A description of a decision, for refusals and logs.
    pub fn explain(&self, decision: Decision) -> String {
        match decision.rule {
            None => format!("the default ({:?})", decision.action).to_lowercase(),
            Some(i) => {
                let rule = &self.config.rules[i];
                let mut who = Vec::new();
                if let Some(uid) = rule.uid {
                    who.push(format!("uid {uid}"));
                }
                if let Some(app) = &rule.app {
                    who.push(format!("app {app:?}"));
                }
                let who = if who.is_empty() {
                    "anyone".to_owned()
                } else {
                    who.join(", ")
                };
                format!(
                    "access rule {} ({:?} {who} -> service {:?})",
                    i + 1,
                    rule.action,
                    rule.service
                )
                .replacen("Allow", "allow", 1)
                .replacen("Deny", "deny", 1)
            }
        }
    }
}

fn matches(rule: &Rule, caller: &Caller, service: &str) -> bool {
    (rule.service == "*" || rule.service == service)
        && rule.uid.is_none_or(|uid| uid == caller.uid)
        && rule.app.as_deref().is_none_or(|app| app == caller.app)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, app: &str) -> Caller {
        Caller {
            pid: 1,
            uid,
            gid: uid,
            app: app.into(),
        }
    }

    fn rule(action: Action, service: &str, uid: Option<u32>, app: Option<&str>) -> Rule {
        Rule {
            action,
            service: service.into(),
            uid,
            app: app.map(Into::into),
        }
    }

    #[test]
    fn first_match_wins_then_the_default() {
        let rules = AccessRules::new(AccessConfig {
            default: Action::Deny,
            rules: vec![
                rule(Action::Deny, "echo", Some(1001), None),
                rule(Action::Allow, "echo", None, None),
                rule(Action::Allow, "*", None, Some("ops")),
            ],
        });
        let d = rules.decide(&caller(1001, "x"), "echo");
        assert_eq!((d.action, d.rule), (Action::Deny, Some(0)));
        let d = rules.decide(&caller(1000, "x"), "echo");
        assert_eq!((d.action, d.rule), (Action::Allow, Some(1)));
        let d = rules.decide(&caller(1000, "ops"), "billing");
        assert_eq!((d.action, d.rule), (Action::Allow, Some(2)));
        let d = rules.decide(&caller(1000, "x"), "billing");
        assert_eq!((d.action, d.rule), (Action::Deny, None));
        assert_eq!(
            rules.explain(rules.decide(&caller(1001, "x"), "echo")),
            "access rule 1 (deny uid 1001 -> service \"echo\")"
        );
        assert_eq!(rules.explain(d), "the default (deny)");
    }
}
