"""Snakemake adapter: spot-model predictions for the spots of one held-out sample."""
from histomap.logs import run_step
from histomap.threads import set_threads


def main(sm):
    set_threads(sm.params.torch_threads)
    device = sm.params.train.get("device", "auto")
    if sm.params.base == "histogene":
        from histomap.tasks.histogene import predict_histogene
        predict_histogene(sm.input.model, sm.input.st, sm.input.slide, sm.output[0],
                          device=device)
        return
    from histomap.tasks.spot import predict_spot_model
    predict_spot_model(sm.input.model, sm.input.st, sm.input.slide, sm.output[0],
                       batch_size=sm.params.train["batch_size"], device=device)


run_step(snakemake.log[0], main, snakemake)  # noqa: F821
