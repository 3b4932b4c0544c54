"""One module per `spnet` verb, each with ``add_arguments(parser)`` and ``run(args)``; ``run`` returns a dict
(printed as the final JSON line), an int (exit code) or None. A verb's module is imported only when it runs: its
name and help live in the table below (add a verb = its module + one row)."""

# verb -> (module in this package, help)
VERBS: dict[str, tuple[str, str]] = {
    'train': ('train', 'train with Hydra overrides key=value ...'),
    'eval': ('eval', 'evaluate a checkpoint: spnet eval checkpoint=<path> data.root=<path> [eval.execution=skip]'),
    'make-tiny-imagenet': ('make_tiny', 'write a tiny learnable ImageNet-format dataset'),
    'ui': ('ui', 'start the MLflow UI on 127.0.0.1 against the tracking store (default: tracking.uri)'),
    'submit': ('submit',
        'submit `spnet train` with these overrides as a SLURM job (submitit; one task per rank, requeued from'
        ' its checkpoint on preemption/timeout); k=a,b sweeps submit one job per value'),
    'jobs': ('jobs',
        'list, inspect, cancel and tail the SLURM jobs submitted with `spnet submit` (ID default: the newest)'),
    'prepare-imagenet': ('prepare_imagenet',
        'write ImageNet as OUT/{train,val}/<wnid>/*.JPEG from the official ILSVRC2012 archives or the Kaggle '
        'layout (resumable; the source is only read)'),
    'check-data': ('check_data',
        'check data.root (Hydra overrides as for train): layout, train/val classes, counts per class, empty '
        'folders, undecodable files; prints a JSON report, exit 1 when something would break training'),
    'study': ('study',
        'cost-accuracy study: a static ResNet, then every --methods x --targets fine-tuned from it (resumable; '
        'MLflow parent run with the frontier on relative axes; last line: JSON)'),
    'frontier': ('frontier',
        "cost-accuracy Pareto frontier (MACs per image vs top-1) of an experiment's finished runs, logged to "
        "MLflow as a run named 'frontier'"),
}
