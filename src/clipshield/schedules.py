"""The learning-rate schedules of a training run (training.lr_at draws them; params.yaml's `schedule` names one),
in a module of their own so that the params schema can name them without importing the training code."""
SCHEDULES = ("cosine", "par", "constant")
