"""The work of each pipeline stage, one module per stage (read inputs, build objects, call the library, write
outputs): stages/<stage>.py calls clipshield.work.<stage> with typed params and every input and output path
(dvc.yaml names them). A stage imports no other stage's module, so a change reruns only the stages it can affect."""
