//! Expansion snapshots: what the macros generate for a small driver and flow, and for a flow
//! `impl` block with an error (its fallback), pretty-printed with `prettyplease` and
//! compared with the files under `snapshots/`. A change to the generated code shows as a
//! diff in review; `FLOWWIRE_BLESS=1 cargo test -p flowwire-macros snapshots` writes the
//! files anew.

use std::path::PathBuf;

use proc_macro2::TokenStream;
use quote::quote;

fn check(name: &str, expansion: &TokenStream) {
    let file: syn::File = syn::parse2(expansion.clone())
        .unwrap_or_else(|e| panic!("the expansion of {name} is not a file of items: {e}"));
    let pretty = prettyplease::unparse(&file);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("snapshots")
        .join(format!("{name}.rs"));
    if std::env::var_os("FLOWWIRE_BLESS").is_some() {
        std::fs::write(&path, &pretty).expect("the snapshot is written");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no snapshot at {}: write it with FLOWWIRE_BLESS=1",
            path.display()
        )
    });
    if expected != pretty {
        let first = expected
            .lines()
            .zip(pretty.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| expected.lines().count().min(pretty.lines().count()));
        panic!(
            "the expansion of {name} changed from line {}:\n  was: {:?}\n  now: {:?}\n(review it, then write it anew with FLOWWIRE_BLESS=1)",
            first + 1,
            expected.lines().nth(first).unwrap_or(""),
            pretty.lines().nth(first).unwrap_or("")
        );
    }
}

#[test]
fn a_driver_trait_and_its_implementation() {
    let args = quote!(timeout = "10s", retries = 2);
    let input = quote! {
        pub trait Payment {
            async fn charge(&self, order: String, cents: u64) -> Result<String, Declined>;
            #[driver(retries = 0, ambiguous = "park")]
            async fn refund(&self, charge: String) -> Result<(), Declined>;
        }
    };
    check("driver_trait", &crate::driver::driver(args, &input));
    let input = quote! {
        impl Payment for Stripe {
            async fn charge(&self, order: String, cents: u64) -> Result<String, Declined> {
                Ok(order)
            }
            async fn refund(&self, charge: String) -> Result<(), Declined> {
                Ok(())
            }
        }
    };
    check("driver_impl", &crate::driver::driver(quote!(), &input));
}

#[test]
fn a_flow_board_and_its_behaviour() {
    let input = quote! {
        pub struct Order {
            #[link]
            state: Basket,
            #[link]
            payment: impl Payment,
        }
    };
    check(
        "flow_struct",
        &crate::flow::flow(quote!(version = 2, migrate = upgrade), &input),
    );
    let input = quote! {
        impl Order {
            #[wire]
            fn run(&mut self) -> Command<Self> {
                Command::finish()
            }
            #[impulse]
            fn pay(&mut self, cents: u64) {
                self.state.paid = cents;
            }
            #[probe]
            fn paid(&self) -> u64 {
                self.state.paid
            }
        }
    };
    check("flow_impl", &crate::flow::flow(quote!(), &input));
}

#[test]
fn a_flow_impl_with_an_error_expands_to_the_error_and_a_stand_in() {
    let input = quote! {
        impl Order {
            fn run(&mut self) -> Command<Self> {
                Command::finish()
            }
        }
    };
    check("flow_impl_fallback", &crate::flow::flow(quote!(), &input));
}
