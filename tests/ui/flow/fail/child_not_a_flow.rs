// A child flow must be a flow: `Command::child::<G>` names a `#[flow]` struct.
use flowwire::prelude::*;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Parent {
    done: bool,
}

#[flow]
pub struct Order {
    #[link]
    state: Parent,
}

#[flow]
impl Order {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        Command::child::<String>("c-1", String::new()).then(|f, _| {
            f.state.done = true;
            Ok(())
        })
    }
}

fn main() {}
