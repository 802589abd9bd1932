"""Reference pipelines, each a DSPy program that reads its dataset's rows as they are.

| program                                | data                  | output                 |
| -------------------------------------- | --------------------- | ---------------------- |
| `plait.pipelines.sentiment:Sentiment`  | SST-2 `{text, label}` | Literal label          |
| `plait.pipelines.rag:RAG`              | SQuAD / HotPotQA      | short answer           |
| `plait.pipelines.multihop:MultiHop`    | HotPotQA              | short answer, 2 hops   |
| `plait.pipelines.math:Math`            | GSM8K                 | int, reasoning first   |
| `plait.pipelines.agent:Agent`          | HotPotQA / GSM8K      | ReAct: calculator, search |

Convention: each class has a `from_row(row) -> dspy.Example` classmethod (used by `plait
compile` and `plait eval`); retrieval pipelines take `index=DIR` (`--program-arg index=DIR`).
"""
