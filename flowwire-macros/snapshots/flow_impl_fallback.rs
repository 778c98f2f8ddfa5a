::core::compile_error! {
    "a flow needs one `#[wire]` method: `#[wire] fn step(&mut self) -> Command<Self>`"
}
impl Order {
    fn run(&mut self) -> Command<Self> {
        Command::finish()
    }
}
#[doc(hidden)]
#[derive(
    ::core::fmt::Debug,
    ::core::clone::Clone,
    ::flowwire::__private::serde::Serialize,
    ::flowwire::__private::serde::Deserialize
)]
#[serde(crate = "::flowwire::__private::serde")]
pub enum OrderImpulse {}
#[automatically_derived]
#[allow(clippy::all, clippy::pedantic, unreachable_code)]
const _: () = {
    impl ::flowwire::__private::ImpulseSet for OrderImpulse {
        fn name(&self) -> &'static str {
            match *self {}
        }
    }
    impl ::flowwire::__private::Impulses for Order {
        type Impulse = OrderImpulse;
    }
    impl ::flowwire::__private::Flow for Order {
        type Handle = OrderHandle;
        const META: &'static ::flowwire::__private::FlowMeta = &::flowwire::__private::FlowMeta {
            name: <Self as ::flowwire::__private::Board>::NAME,
            version: <Self as ::flowwire::__private::Board>::VERSION,
            state: <Self as ::flowwire::__private::Board>::STATE,
            wire: "",
            links: <Self as ::flowwire::__private::Board>::LINKS,
            impulses: &[],
            probes: &[],
            correlation: ::core::option::Option::None,
        };
        fn wire(&mut self) -> ::flowwire::__private::Command<Self> {
            ::core::unreachable!("a flow that did not compile")
        }
        fn apply_impulse(&mut self, impulse: OrderImpulse) {
            match impulse {}
        }
    }
};
