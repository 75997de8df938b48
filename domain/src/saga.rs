//! The checkout saga as a pure state machine: `transition(SagaState, SagaInput) -> (SagaState,
//! Vec<SagaCommand>)`.
//!
//! Steps: reserve inventory -> authorize payment -> create shipment -> confirm the order. Each
//! step arms a deadline; a deadline that fires re-sends the step (participants are idempotent
//! per order) until `max_attempts`, then the saga compensates. Compensation releases inventory
//! and voids payment for everything that *may* be held: a step that timed out may have
//! succeeded at the participant without us hearing of it, so it is compensated too (release and
//! void are idempotent, and harmless when nothing is held). Replies that arrive after the saga
//! ended are answered with the compensation they need (a late `PaymentAuthorized` on a cancelled
//! saga gets a `VoidPayment`), so nothing is ever left held.
//!
//! Replies that do not match the current step (duplicates, stale deadlines) change nothing.

use serde::{Deserialize, Serialize};

use crate::{
    order::OrderLine,
    personal::{Payment, Protected},
    values::{Currency, MinorUnits, OrderId, Quantity, ShippingAddress, Sku},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Inventory,
    Payment,
    Shipment,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    NotStarted,
    Awaiting(Step),
    Confirmed,
    Cancelled,
}

/// What the saga needs from the placed order to run every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaOrder {
    pub order_id: OrderId,
    pub lines: Vec<(Sku, Quantity)>,
    pub amount_minor: MinorUnits,
    pub currency: Currency,
    /// Saga state recorded before sealing named it `payment_token` and held the token.
    #[serde(alias = "payment_token")]
    pub payment: Payment,
    pub shipping_address: Protected<ShippingAddress>,
}

impl SagaOrder {
    pub fn from_lines(
        order_id: OrderId,
        lines: &[OrderLine],
        amount_minor: MinorUnits,
        currency: Currency,
        payment: Payment,
        shipping_address: Protected<ShippingAddress>,
    ) -> Self {
        Self {
            order_id,
            lines: lines.iter().map(|l| (l.sku.clone(), l.quantity)).collect(),
            amount_minor,
            currency,
            payment,
            shipping_address,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SagaInput {
    OrderPlaced {
        order: SagaOrder,
    },
    InventoryReserved {
        reservation_id: String,
    },
    InventoryUnavailable {
        reason: String,
    },
    PaymentAuthorized {
        authorization_id: String,
    },
    PaymentDeclined {
        reason: String,
    },
    ShipmentCreated {
        shipment_id: String,
    },
    ShipmentFailed {
        reason: String,
    },
    /// The deadline armed for `attempt` of `step` passed without a reply.
    DeadlineExpired {
        step: Step,
        attempt: u32,
    },
    /// The order was cancelled outside the saga (by the customer or an operator).
    OrderCancelled,
}

impl SagaInput {
    /// The input's kind, for logs and spans.
    pub fn name(&self) -> &'static str {
        match self {
            SagaInput::OrderPlaced { .. } => "order_placed",
            SagaInput::InventoryReserved { .. } => "inventory_reserved",
            SagaInput::InventoryUnavailable { .. } => "inventory_unavailable",
            SagaInput::PaymentAuthorized { .. } => "payment_authorized",
            SagaInput::PaymentDeclined { .. } => "payment_declined",
            SagaInput::ShipmentCreated { .. } => "shipment_created",
            SagaInput::ShipmentFailed { .. } => "shipment_failed",
            SagaInput::DeadlineExpired { .. } => "deadline_expired",
            SagaInput::OrderCancelled => "order_cancelled",
        }
    }

    /// The step a participant's reply answers (`None` for inputs that are not replies).
    pub fn answers(&self) -> Option<Step> {
        match self {
            SagaInput::InventoryReserved { .. } | SagaInput::InventoryUnavailable { .. } => {
                Some(Step::Inventory)
            }
            SagaInput::PaymentAuthorized { .. } | SagaInput::PaymentDeclined { .. } => {
                Some(Step::Payment)
            }
            SagaInput::ShipmentCreated { .. } | SagaInput::ShipmentFailed { .. } => {
                Some(Step::Shipment)
            }
            SagaInput::OrderPlaced { .. }
            | SagaInput::DeadlineExpired { .. }
            | SagaInput::OrderCancelled => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SagaCommand {
    // to participants
    ReserveInventory {
        order_id: OrderId,
        lines: Vec<(Sku, Quantity)>,
    },
    ReleaseInventory {
        order_id: OrderId,
    },
    AuthorizePayment {
        order_id: OrderId,
        amount_minor: MinorUnits,
        currency: Currency,
        /// Commands sent before sealing named it `payment_token` and carried the token.
        #[serde(alias = "payment_token")]
        payment: Payment,
    },
    VoidPayment {
        order_id: OrderId,
    },
    CreateShipment {
        order_id: OrderId,
        address: Protected<ShippingAddress>,
    },
    // to the order aggregate
    MarkInventoryReserved {
        order_id: OrderId,
        reservation_id: String,
    },
    MarkPaymentAuthorized {
        order_id: OrderId,
        authorization_id: String,
    },
    ConfirmOrder {
        order_id: OrderId,
        shipment_id: String,
    },
    CancelOrder {
        order_id: OrderId,
        reason: String,
    },
    // to the runtime
    ArmDeadline {
        step: Step,
        attempt: u32,
    },
}

impl SagaCommand {
    /// The participant a command goes to (`inventory`, `payment`, `shipping`) and the order
    /// it is about; `None` for the commands that stay in the process.
    pub fn participant(&self) -> Option<(&'static str, OrderId)> {
        match self {
            SagaCommand::ReserveInventory { order_id, .. }
            | SagaCommand::ReleaseInventory { order_id } => Some(("inventory", *order_id)),
            SagaCommand::AuthorizePayment { order_id, .. }
            | SagaCommand::VoidPayment { order_id } => Some(("payment", *order_id)),
            SagaCommand::CreateShipment { order_id, .. } => Some(("shipping", *order_id)),
            _ => None,
        }
    }

    /// The step whose reply this participant command asks for (`None` for compensations,
    /// which are not answered, and for commands that stay in the process).
    pub fn requests(&self) -> Option<Step> {
        match self {
            SagaCommand::ReserveInventory { .. } => Some(Step::Inventory),
            SagaCommand::AuthorizePayment { .. } => Some(Step::Payment),
            SagaCommand::CreateShipment { .. } => Some(Step::Shipment),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaState {
    pub phase: Phase,
    pub order: Option<SagaOrder>,
    /// Attempt number of the current step (1-based).
    pub attempt: u32,
    /// How many times a step is sent before the saga gives up on it.
    pub max_attempts: u32,
    /// A ReserveInventory went out and was not refused: inventory may be held.
    pub inventory_maybe_held: bool,
    /// An AuthorizePayment went out and was not declined: money may be held.
    pub payment_maybe_held: bool,
    /// Why the saga cancelled the order, when it did.
    pub cancel_reason: Option<String>,
}

impl SagaState {
    pub fn new(max_attempts: u32) -> Self {
        Self {
            phase: Phase::NotStarted,
            order: None,
            attempt: 0,
            max_attempts: max_attempts.max(1),
            inventory_maybe_held: false,
            payment_maybe_held: false,
            cancel_reason: None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.phase, Phase::Confirmed | Phase::Cancelled)
    }
}

/// What the saga decided, as recorded in its stream: the audit of why it did what it did
/// (schemas in `schemas/saga/`). The state is the fold of these ([`evolve`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SagaEvent {
    /// An order was placed; the saga takes it on.
    Started { order: SagaOrder },
    /// `attempt` of `step` was sent to its participant (a deadline is armed with it).
    StepRequested { step: Step, attempt: u32 },
    /// The participant did `step`; `result_id` is its reservation, authorization or shipment.
    StepSucceeded {
        step: Step,
        attempt: u32,
        result_id: String,
    },
    /// `step` did not succeed on `attempt`, and why.
    StepFailed {
        step: Step,
        attempt: u32,
        reason: String,
        kind: FailureKind,
    },
    /// The saga gave up and undoes what may be held; `cancel_order` is false when the order
    /// was cancelled outside the saga (it already is).
    CompensationStarted {
        reason: String,
        release_inventory: bool,
        void_payment: bool,
        cancel_order: bool,
    },
    /// Every step succeeded; the order is confirmed.
    Completed,
    /// A success arrived after the saga ended (or before it asked): it is undone.
    LateReplyCompensated { step: Step },
}

/// How a step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The participant refused (out of stock, payment declined): nothing is held.
    Refused,
    /// The participant failed (shipping): what earlier steps hold stays held until compensated.
    Failed,
    /// No answer before the deadline: the step may have happened without our hearing of it.
    TimedOut,
}

impl SagaEvent {
    /// The stored event type of each decision.
    pub fn event_type(&self) -> &'static str {
        match self {
            SagaEvent::Started { .. } => "SagaStarted",
            SagaEvent::StepRequested { .. } => "SagaStepRequested",
            SagaEvent::StepSucceeded { .. } => "SagaStepSucceeded",
            SagaEvent::StepFailed { .. } => "SagaStepFailed",
            SagaEvent::CompensationStarted { .. } => "SagaCompensationStarted",
            SagaEvent::Completed => "SagaCompleted",
            SagaEvent::LateReplyCompensated { .. } => "SagaLateReplyCompensated",
        }
    }

    /// Every decision event type (schemas exist for each, version 1).
    pub const TYPES: [&'static str; 7] = [
        "SagaStarted",
        "SagaStepRequested",
        "SagaStepSucceeded",
        "SagaStepFailed",
        "SagaCompensationStarted",
        "SagaCompleted",
        "SagaLateReplyCompensated",
    ];
}

/// Applies one recorded decision to the state. The only place the state changes.
pub fn evolve(mut s: SagaState, e: &SagaEvent) -> SagaState {
    match e {
        SagaEvent::Started { order } => s.order = Some(order.clone()),
        SagaEvent::StepRequested { step, attempt } => {
            s.phase = Phase::Awaiting(*step);
            s.attempt = *attempt;
            match step {
                Step::Inventory => s.inventory_maybe_held = true,
                Step::Payment => s.payment_maybe_held = true,
                Step::Shipment => {}
            }
        }
        SagaEvent::StepFailed {
            step,
            kind: FailureKind::Refused,
            ..
        } => match step {
            Step::Inventory => s.inventory_maybe_held = false,
            Step::Payment => s.payment_maybe_held = false,
            Step::Shipment => {}
        },
        SagaEvent::CompensationStarted { reason, .. } => {
            s.cancel_reason = Some(reason.clone());
            s.phase = Phase::Cancelled;
        }
        SagaEvent::Completed => s.phase = Phase::Confirmed,
        SagaEvent::StepSucceeded { .. }
        | SagaEvent::StepFailed { .. }
        | SagaEvent::LateReplyCompensated { .. } => {}
    }
    s
}

/// Decides what `input` means for the saga in state `s`: the decisions to record and the
/// commands to send. An input that changes nothing (a duplicate, a stale deadline, a reply
/// for another step) gives neither.
pub fn decide(s: &SagaState, input: SagaInput) -> (Vec<SagaEvent>, Vec<SagaCommand>) {
    let mut d = Decision {
        state: s.clone(),
        events: Vec::new(),
        commands: Vec::new(),
    };
    d.take(input);
    (d.events, d.commands)
}

/// [`decide`], then the state after its decisions.
pub fn transition(s: SagaState, input: SagaInput) -> (SagaState, Vec<SagaCommand>) {
    let (events, commands) = decide(&s, input);
    (events.iter().fold(s, evolve), commands)
}

/// Folds recorded inputs into the state, discarding the commands (sagas recorded before
/// decisions were: their streams hold `SagaInputRecorded` events).
pub fn replay<'a>(max_attempts: u32, inputs: impl IntoIterator<Item = &'a SagaInput>) -> SagaState {
    inputs
        .into_iter()
        .fold(SagaState::new(max_attempts), |s, i| {
            transition(s, i.clone()).0
        })
}

/// A decision in the making: each recorded event is applied to `state` at once, so later
/// steps of one decision see its earlier ones.
struct Decision {
    state: SagaState,
    events: Vec<SagaEvent>,
    commands: Vec<SagaCommand>,
}

impl Decision {
    fn record(&mut self, e: SagaEvent) {
        self.state = evolve(self.state.clone(), &e);
        self.events.push(e);
    }

    // Long on purpose: the saga's transition table, one arm per (phase, input); a table split
    // over functions is harder to check for a missing case.
    fn take(&mut self, input: SagaInput) {
        use SagaInput as I;
        let attempt = self.state.attempt;
        match (self.state.phase, input) {
            (Phase::NotStarted, I::OrderPlaced { order }) => {
                self.record(SagaEvent::Started { order });
                self.request(Step::Inventory, 1);
            }
            (Phase::Awaiting(Step::Inventory), I::InventoryReserved { reservation_id }) => {
                let order_id = self.state.order_id();
                self.succeeded(Step::Inventory, attempt, reservation_id.clone());
                self.commands.push(SagaCommand::MarkInventoryReserved {
                    order_id,
                    reservation_id,
                });
                self.request(Step::Payment, 1);
            }
            (Phase::Awaiting(Step::Inventory), I::InventoryUnavailable { reason }) => {
                self.failed(Step::Inventory, attempt, &reason, FailureKind::Refused);
                self.compensate(format!("inventory unavailable: {reason}"), true);
            }
            (Phase::Awaiting(Step::Payment), I::PaymentAuthorized { authorization_id }) => {
                let order_id = self.state.order_id();
                self.succeeded(Step::Payment, attempt, authorization_id.clone());
                self.commands.push(SagaCommand::MarkPaymentAuthorized {
                    order_id,
                    authorization_id,
                });
                self.request(Step::Shipment, 1);
            }
            (Phase::Awaiting(Step::Payment), I::PaymentDeclined { reason }) => {
                self.failed(Step::Payment, attempt, &reason, FailureKind::Refused);
                self.compensate(format!("payment declined: {reason}"), true);
            }
            (Phase::Awaiting(Step::Shipment), I::ShipmentCreated { shipment_id }) => {
                let order_id = self.state.order_id();
                self.succeeded(Step::Shipment, attempt, shipment_id.clone());
                self.commands.push(SagaCommand::ConfirmOrder {
                    order_id,
                    shipment_id,
                });
                self.record(SagaEvent::Completed);
            }
            (Phase::Awaiting(Step::Shipment), I::ShipmentFailed { reason }) => {
                self.failed(Step::Shipment, attempt, &reason, FailureKind::Failed);
                self.compensate(format!("shipment failed: {reason}"), true);
            }
            (
                Phase::Awaiting(step),
                I::DeadlineExpired {
                    step: expired,
                    attempt: timed_out,
                },
            ) if expired == step && timed_out == attempt => {
                self.failed(step, attempt, "no reply in time", FailureKind::TimedOut);
                if attempt < self.state.max_attempts {
                    self.request(step, attempt + 1);
                } else {
                    let reason = format!(
                        "{} step timed out after {attempt} attempts",
                        step_name(step)
                    );
                    self.compensate(reason, true);
                }
            }
            (Phase::Awaiting(_), I::OrderCancelled) => {
                self.compensate("order cancelled".into(), false);
            }
            // Late successes after the saga gave up, or successes for a step it never asked
            // for yet (a misrouted or forged reply): undo them. A duplicate of a step already
            // taken is ignored below.
            (Phase::Cancelled, I::InventoryReserved { .. }) => {
                self.record(SagaEvent::LateReplyCompensated {
                    step: Step::Inventory,
                });
                let order_id = self.state.order_id();
                self.commands
                    .push(SagaCommand::ReleaseInventory { order_id });
            }
            (Phase::Cancelled | Phase::Awaiting(Step::Inventory), I::PaymentAuthorized { .. }) => {
                self.record(SagaEvent::LateReplyCompensated {
                    step: Step::Payment,
                });
                let order_id = self.state.order_id();
                self.commands.push(SagaCommand::VoidPayment { order_id });
            }
            // Duplicates, stale deadlines, replies for other steps, anything after the end.
            _ => {}
        }
    }

    fn succeeded(&mut self, step: Step, attempt: u32, result_id: String) {
        self.record(SagaEvent::StepSucceeded {
            step,
            attempt,
            result_id,
        });
    }

    fn failed(&mut self, step: Step, attempt: u32, reason: &str, kind: FailureKind) {
        self.record(SagaEvent::StepFailed {
            step,
            attempt,
            reason: reason.to_owned(),
            kind,
        });
    }

    /// Sends `attempt` of `step` and arms its deadline.
    fn request(&mut self, step: Step, attempt: u32) {
        self.record(SagaEvent::StepRequested { step, attempt });
        let o = self
            .state
            .order
            .as_ref()
            .expect("a started saga has its order");
        self.commands.push(match step {
            Step::Inventory => SagaCommand::ReserveInventory {
                order_id: o.order_id,
                lines: o.lines.clone(),
            },
            Step::Payment => SagaCommand::AuthorizePayment {
                order_id: o.order_id,
                amount_minor: o.amount_minor,
                currency: o.currency,
                payment: o.payment.clone(),
            },
            Step::Shipment => SagaCommand::CreateShipment {
                order_id: o.order_id,
                address: o.shipping_address.clone(),
            },
        });
        self.commands
            .push(SagaCommand::ArmDeadline { step, attempt });
    }

    /// Gives up: voids and releases whatever may be held, and cancels the order unless it
    /// was cancelled outside the saga.
    fn compensate(&mut self, reason: String, cancel_order: bool) {
        let order_id = self.state.order_id();
        let (void_payment, release_inventory) = (
            self.state.payment_maybe_held,
            self.state.inventory_maybe_held,
        );
        self.record(SagaEvent::CompensationStarted {
            reason: reason.clone(),
            release_inventory,
            void_payment,
            cancel_order,
        });
        if void_payment {
            self.commands.push(SagaCommand::VoidPayment { order_id });
        }
        if release_inventory {
            self.commands
                .push(SagaCommand::ReleaseInventory { order_id });
        }
        if cancel_order {
            self.commands
                .push(SagaCommand::CancelOrder { order_id, reason });
        }
    }
}

impl SagaState {
    fn order_id(&self) -> OrderId {
        self.order
            .as_ref()
            .expect("a started saga has its order")
            .order_id
    }
}

/// Event type of a recorded saga input: what sagas recorded before they recorded their
/// decisions ([`SagaEvent`]). Still read, never written.
pub const INPUT_RECORDED: &str = "SagaInputRecorded";

/// The saga's stream id: the order id with its UUID version nibble flipped (7 -> 8), so it
/// can never equal an order id (v7) yet maps back one to one.
pub fn stream_id(order_id: OrderId) -> uuid::Uuid {
    uuid::Uuid::from_u128(order_id.0.as_u128() ^ (0xF_u128 << 76))
}

/// One stored event of a saga's stream: a recorded decision, or (older streams) an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Decision(SagaEvent),
    Input(SagaInput),
}

impl Recorded {
    pub fn parse(event_type: &str, payload: serde_json::Value) -> Result<Self, serde_json::Error> {
        Ok(if event_type == INPUT_RECORDED {
            Recorded::Input(serde_json::from_value(payload)?)
        } else {
            Recorded::Decision(serde_json::from_value(payload)?)
        })
    }

    /// The state after this event: a decision is folded with [`evolve`], an input replayed.
    pub fn apply(&self, state: SagaState) -> SagaState {
        match self {
            Recorded::Decision(e) => evolve(state, e),
            Recorded::Input(i) => transition(state, i.clone()).0,
        }
    }
}

/// A saga's state from its stored events `(event_type, payload)` in version order. Pure, so
/// the saga runtime and the read side fold a stream the same way ([`Recorded`]).
pub fn fold_stream(
    max_attempts: u32,
    events: impl IntoIterator<Item = (String, serde_json::Value)>,
) -> Result<SagaState, serde_json::Error> {
    let mut state = SagaState::new(max_attempts);
    for (event_type, payload) in events {
        state = Recorded::parse(&event_type, payload)?.apply(state);
    }
    Ok(state)
}

/// A step's name in reasons and read models.
pub fn step_name(step: Step) -> &'static str {
    match step {
        Step::Inventory => "inventory",
        Step::Payment => "payment",
        Step::Shipment => "shipment",
    }
}

/// The step named `s` ([`step_name`]'s inverse).
pub fn parse_step(s: &str) -> Option<Step> {
    [Step::Inventory, Step::Payment, Step::Shipment]
        .into_iter()
        .find(|step| step_name(*step) == s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: u32 = 3;

    fn order() -> SagaOrder {
        SagaOrder {
            order_id: OrderId(uuid::Uuid::from_u128(7)),
            lines: vec![(Sku::parse("A").unwrap(), Quantity::parse(2).unwrap())],
            amount_minor: MinorUnits::parse(500).unwrap(),
            currency: Currency::parse("EUR").unwrap(),
            payment: Payment::Ref(crate::personal::PaymentRef(uuid::Uuid::from_u128(9))),
            shipping_address: Protected::Sealed(crate::personal::Sealed {
                key_id: uuid::Uuid::from_u128(3),
                nonce: "AAAAAAAAAAAAAAAA".into(),
                ciphertext: "c2VhbGVkIGFkZHJlc3MgYnl0ZXMgaGVyZQ==".into(),
            }),
        }
    }

    fn oid() -> OrderId {
        order().order_id
    }

    /// given the inputs so far, when `input`, then (phase, commands).
    fn given(history: &[SagaInput], input: SagaInput) -> (SagaState, Vec<SagaCommand>) {
        transition(replay(MAX, history), input)
    }

    fn placed() -> Vec<SagaInput> {
        vec![SagaInput::OrderPlaced { order: order() }]
    }

    fn reserved() -> Vec<SagaInput> {
        let mut h = placed();
        h.push(SagaInput::InventoryReserved {
            reservation_id: "r".into(),
        });
        h
    }

    fn authorized() -> Vec<SagaInput> {
        let mut h = reserved();
        h.push(SagaInput::PaymentAuthorized {
            authorization_id: "a".into(),
        });
        h
    }

    fn kinds(cmds: &[SagaCommand]) -> Vec<&'static str> {
        cmds.iter()
            .map(|c| match c {
                SagaCommand::ReserveInventory { .. } => "reserve",
                SagaCommand::ReleaseInventory { .. } => "release",
                SagaCommand::AuthorizePayment { .. } => "authorize",
                SagaCommand::VoidPayment { .. } => "void",
                SagaCommand::CreateShipment { .. } => "ship",
                SagaCommand::MarkInventoryReserved { .. } => "mark_reserved",
                SagaCommand::MarkPaymentAuthorized { .. } => "mark_authorized",
                SagaCommand::ConfirmOrder { .. } => "confirm",
                SagaCommand::CancelOrder { .. } => "cancel",
                SagaCommand::ArmDeadline { .. } => "deadline",
            })
            .collect()
    }

    #[test]
    fn order_placed_reserves_inventory_and_arms_a_deadline() {
        let (s, cmds) = given(&[], SagaInput::OrderPlaced { order: order() });
        assert_eq!(s.phase, Phase::Awaiting(Step::Inventory));
        assert_eq!(kinds(&cmds), ["reserve", "deadline"]);
        assert_eq!(
            cmds[1],
            SagaCommand::ArmDeadline {
                step: Step::Inventory,
                attempt: 1
            }
        );
    }

    #[test]
    fn inventory_reserved_marks_the_order_and_authorizes_payment() {
        let (s, cmds) = given(
            &placed(),
            SagaInput::InventoryReserved {
                reservation_id: "r".into(),
            },
        );
        assert_eq!(s.phase, Phase::Awaiting(Step::Payment));
        assert_eq!(kinds(&cmds), ["mark_reserved", "authorize", "deadline"]);
        let SagaCommand::AuthorizePayment { amount_minor, .. } = &cmds[1] else {
            panic!()
        };
        assert_eq!(amount_minor.get(), 500);
    }

    #[test]
    fn payment_authorized_creates_the_shipment() {
        let (s, cmds) = given(
            &reserved(),
            SagaInput::PaymentAuthorized {
                authorization_id: "a".into(),
            },
        );
        assert_eq!(s.phase, Phase::Awaiting(Step::Shipment));
        assert_eq!(kinds(&cmds), ["mark_authorized", "ship", "deadline"]);
    }

    #[test]
    fn shipment_created_confirms_the_order() {
        let (s, cmds) = given(
            &authorized(),
            SagaInput::ShipmentCreated {
                shipment_id: "s".into(),
            },
        );
        assert_eq!(s.phase, Phase::Confirmed);
        assert_eq!(
            cmds,
            vec![SagaCommand::ConfirmOrder {
                order_id: oid(),
                shipment_id: "s".into()
            }]
        );
    }

    #[test]
    fn out_of_stock_cancels_without_compensation() {
        let (s, cmds) = given(
            &placed(),
            SagaInput::InventoryUnavailable { reason: "A".into() },
        );
        assert_eq!(s.phase, Phase::Cancelled);
        assert_eq!(kinds(&cmds), ["cancel"]);
    }

    #[test]
    fn payment_declined_releases_inventory_and_cancels() {
        let (s, cmds) = given(
            &reserved(),
            SagaInput::PaymentDeclined {
                reason: "insufficient funds".into(),
            },
        );
        assert_eq!(s.phase, Phase::Cancelled);
        assert_eq!(kinds(&cmds), ["release", "cancel"]);
        let SagaCommand::CancelOrder { reason, .. } = &cmds[1] else {
            panic!()
        };
        assert_eq!(reason, "payment declined: insufficient funds");
    }

    #[test]
    fn shipment_failed_voids_payment_and_releases_inventory() {
        let (s, cmds) = given(
            &authorized(),
            SagaInput::ShipmentFailed {
                reason: "no carrier".into(),
            },
        );
        assert_eq!(s.phase, Phase::Cancelled);
        assert_eq!(kinds(&cmds), ["void", "release", "cancel"]);
    }

    #[test]
    fn a_deadline_resends_the_step_then_compensates() {
        let mut h = reserved();
        for attempt in 1..MAX {
            let (s, cmds) = given(
                &h,
                SagaInput::DeadlineExpired {
                    step: Step::Payment,
                    attempt,
                },
            );
            assert_eq!(kinds(&cmds), ["authorize", "deadline"], "attempt {attempt}");
            assert_eq!(s.attempt, attempt + 1);
            h.push(SagaInput::DeadlineExpired {
                step: Step::Payment,
                attempt,
            });
        }
        let (s, cmds) = given(
            &h,
            SagaInput::DeadlineExpired {
                step: Step::Payment,
                attempt: MAX,
            },
        );
        assert_eq!(s.phase, Phase::Cancelled);
        // The payment may have gone through unheard: it is voided too.
        assert_eq!(kinds(&cmds), ["void", "release", "cancel"]);
    }

    #[test]
    fn stale_deadlines_and_duplicate_replies_change_nothing() {
        let h = reserved();
        let before = replay(MAX, &h);
        for input in [
            SagaInput::DeadlineExpired {
                step: Step::Inventory,
                attempt: 1,
            },
            SagaInput::DeadlineExpired {
                step: Step::Payment,
                attempt: 2,
            },
            SagaInput::InventoryReserved {
                reservation_id: "r".into(),
            },
            SagaInput::OrderPlaced { order: order() },
            SagaInput::ShipmentCreated {
                shipment_id: "s".into(),
            },
        ] {
            let (s, cmds) = given(&h, input.clone());
            assert_eq!(s, before, "{input:?}");
            assert!(cmds.is_empty(), "{input:?}");
        }
    }

    #[test]
    fn an_external_cancel_compensates_without_cancelling_again() {
        let (s, cmds) = given(&reserved(), SagaInput::OrderCancelled);
        assert_eq!(s.phase, Phase::Cancelled);
        assert_eq!(kinds(&cmds), ["void", "release"]);
    }

    #[test]
    fn late_successes_after_cancellation_are_undone() {
        let mut h = reserved();
        h.push(SagaInput::PaymentDeclined { reason: "x".into() });
        let (_, cmds) = given(
            &h,
            SagaInput::PaymentAuthorized {
                authorization_id: "late".into(),
            },
        );
        assert_eq!(kinds(&cmds), ["void"]);
        let (_, cmds) = given(
            &h,
            SagaInput::InventoryReserved {
                reservation_id: "late".into(),
            },
        );
        assert_eq!(kinds(&cmds), ["release"]);
    }

    #[test]
    fn nothing_happens_after_confirmation() {
        let mut h = authorized();
        h.push(SagaInput::ShipmentCreated {
            shipment_id: "s".into(),
        });
        for input in [
            SagaInput::OrderCancelled,
            SagaInput::PaymentDeclined { reason: "x".into() },
        ] {
            let (s, cmds) = given(&h, input);
            assert_eq!(s.phase, Phase::Confirmed);
            assert!(cmds.is_empty());
        }
    }

    fn any_input() -> impl Strategy<Value = SagaInput> {
        let step = prop_oneof![
            Just(Step::Inventory),
            Just(Step::Payment),
            Just(Step::Shipment)
        ];
        prop_oneof![
            Just(SagaInput::InventoryReserved {
                reservation_id: "r".into()
            }),
            Just(SagaInput::InventoryUnavailable { reason: "x".into() }),
            Just(SagaInput::PaymentAuthorized {
                authorization_id: "a".into()
            }),
            Just(SagaInput::PaymentDeclined { reason: "x".into() }),
            Just(SagaInput::ShipmentCreated {
                shipment_id: "s".into()
            }),
            Just(SagaInput::ShipmentFailed { reason: "x".into() }),
            Just(SagaInput::OrderCancelled),
            (step, 1..=MAX + 1)
                .prop_map(|(step, attempt)| SagaInput::DeadlineExpired { step, attempt }),
        ]
    }

    fn saga_schema(event_type: &str) -> jsonschema::Validator {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas/saga")
            .join(format!("{event_type}.v1.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        jsonschema::validator_for(&value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn a_declined_payment_records_why_and_what_is_undone() {
        let (events, _) = decide(
            &replay(MAX, &reserved()),
            SagaInput::PaymentDeclined {
                reason: "card expired".into(),
            },
        );
        assert_eq!(
            events,
            vec![
                SagaEvent::StepFailed {
                    step: Step::Payment,
                    attempt: 1,
                    reason: "card expired".into(),
                    kind: FailureKind::Refused,
                },
                SagaEvent::CompensationStarted {
                    reason: "payment declined: card expired".into(),
                    release_inventory: true,
                    void_payment: false,
                    cancel_order: true,
                },
            ]
        );
    }

    #[test]
    fn a_timed_out_step_is_recorded_then_sent_again() {
        let (events, commands) = decide(
            &replay(MAX, &placed()),
            SagaInput::DeadlineExpired {
                step: Step::Inventory,
                attempt: 1,
            },
        );
        assert_eq!(
            events,
            vec![
                SagaEvent::StepFailed {
                    step: Step::Inventory,
                    attempt: 1,
                    reason: "no reply in time".into(),
                    kind: FailureKind::TimedOut,
                },
                SagaEvent::StepRequested {
                    step: Step::Inventory,
                    attempt: 2,
                },
            ]
        );
        assert!(matches!(commands[0], SagaCommand::ReserveInventory { .. }));
    }

    #[test]
    fn a_duplicate_reply_records_nothing() {
        let (events, commands) = decide(
            &replay(MAX, &reserved()),
            SagaInput::InventoryReserved {
                reservation_id: "r".into(),
            },
        );
        assert!(events.is_empty() && commands.is_empty());
    }

    proptest! {
        /// Loading a saga from its recorded decisions, as stored (JSON), gives the state that
        /// replaying its inputs gives (old streams of inputs and new streams of decisions
        /// agree), and every decision validates against its schema.
        #[test]
        fn decisions_fold_to_the_state_inputs_replay_to(
            inputs in proptest::collection::vec(any_input(), 0..30)
        ) {
            let mut all = vec![SagaInput::OrderPlaced { order: order() }];
            all.extend(inputs);
            let mut by_inputs = SagaState::new(MAX);
            let mut by_events = SagaState::new(MAX);
            for i in &all {
                let (events, _) = decide(&by_inputs, i.clone());
                let mut stored = Vec::with_capacity(events.len());
                for e in &events {
                    let json = serde_json::to_value(e).unwrap();
                    let errors: Vec<String> = saga_schema(e.event_type())
                        .iter_errors(&json)
                        .map(|e| e.to_string())
                        .collect();
                    prop_assert!(errors.is_empty(), "{}: {errors:?}\n{json}", e.event_type());
                    let reloaded = serde_json::from_value::<SagaEvent>(json).unwrap();
                    prop_assert_eq!(&reloaded, e);
                    stored.push(reloaded);
                }
                // What a load folds: the events as read back, not the ones in memory.
                by_events = stored.iter().fold(by_events, evolve);
                by_inputs = transition(by_inputs, i.clone()).0;
                prop_assert_eq!(&by_events, &by_inputs);
            }
            prop_assert_eq!(by_inputs, replay(MAX, &all));
        }

        /// Any sequence of replies, followed by the deadlines of whatever is still pending,
        /// ends CONFIRMED or CANCELLED; a cancelled saga has released the inventory and voided
        /// the payment it may hold (after the last success it heard of), a confirmed one has
        /// compensated nothing.
        #[test]
        fn every_saga_ends_and_cancelled_ones_hold_nothing(
            inputs in proptest::collection::vec(any_input(), 0..40)
        ) {
            let mut s = SagaState::new(MAX);
            let mut all = Vec::new();
            let feed = |s: SagaState, i: SagaInput, all: &mut Vec<(SagaInput, Vec<SagaCommand>)>| {
                let (s, cmds) = transition(s, i.clone());
                all.push((i, cmds));
                s
            };
            s = feed(s, SagaInput::OrderPlaced { order: order() }, &mut all);
            for i in inputs {
                s = feed(s, i, &mut all);
            }
            let mut guard = 0;
            while let Phase::Awaiting(step) = s.phase {
                let attempt = s.attempt;
                s = feed(s, SagaInput::DeadlineExpired { step, attempt }, &mut all);
                guard += 1;
                prop_assert!(guard <= 3 * MAX, "saga does not end on deadlines");
            }
            prop_assert!(s.is_terminal());

            let cmds: Vec<&SagaCommand> = all.iter().flat_map(|(_, c)| c).collect();
            let last = |pred: &dyn Fn(&SagaCommand) -> bool| cmds.iter().rposition(|c| pred(c));
            let reserve_sent = last(&|c| matches!(c, SagaCommand::ReserveInventory { .. }));
            let release_sent = last(&|c| matches!(c, SagaCommand::ReleaseInventory { .. }));
            let authorize_sent = last(&|c| matches!(c, SagaCommand::AuthorizePayment { .. }));
            let void_sent = last(&|c| matches!(c, SagaCommand::VoidPayment { .. }));
            let refused_stock = all.iter().any(|(i, _)| matches!(i, SagaInput::InventoryUnavailable { .. }));
            let declined = all.iter().any(|(i, _)| matches!(i, SagaInput::PaymentDeclined { .. }));
            match s.phase {
                Phase::Cancelled => {
                    if reserve_sent.is_some() && !refused_stock {
                        prop_assert!(release_sent > reserve_sent, "inventory may be held: {all:?}");
                    }
                    if authorize_sent.is_some() && !declined {
                        prop_assert!(void_sent > authorize_sent, "payment may be held: {all:?}");
                    }
                    // Every success heard (also late ones) is followed by its compensation.
                    for (idx, (input, _)) in all.iter().enumerate() {
                        let after: Vec<&SagaCommand> = all[idx..].iter().flat_map(|(_, c)| c).collect();
                        if matches!(input, SagaInput::InventoryReserved { .. }) {
                            prop_assert!(after.iter().any(|c| matches!(c, SagaCommand::ReleaseInventory { .. })), "reservation not released: {:?}", all);
                        }
                        if matches!(input, SagaInput::PaymentAuthorized { .. }) && s.phase == Phase::Cancelled {
                            prop_assert!(after.iter().any(|c| matches!(c, SagaCommand::VoidPayment { .. })), "authorization not voided: {:?}", all);
                        }
                    }
                    prop_assert!(cmds.iter().all(|c| !matches!(c, SagaCommand::ConfirmOrder { .. })), "cancelled saga confirmed");
                }
                Phase::Confirmed => {
                    prop_assert_eq!(cmds.iter().filter(|c| matches!(c, SagaCommand::ConfirmOrder { .. })).count(), 1);
                    prop_assert!(release_sent.is_none(), "confirmed saga released inventory");
                    // The only voids allowed are for authorizations never asked for.
                    let first_authorize = cmds.iter().position(|c| matches!(c, SagaCommand::AuthorizePayment { .. }));
                    prop_assert!(void_sent.is_none() || void_sent < first_authorize, "confirmed saga voided its payment");
                    prop_assert!(cmds.iter().all(|c| !matches!(c, SagaCommand::CancelOrder { .. })), "confirmed saga cancelled");
                }
                _ => unreachable!(),
            }
        }
    }
}
