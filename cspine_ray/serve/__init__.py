"""Online inference: the champion ensemble behind a Ray Serve HTTP endpoint.

    archive  an uploaded zip/tar -> a folder of plain files, refusing what could escape or explode
    app      FractureService: the Serve replica (unpack, shard, batch, answer)
    cli      `python -m cspine_ray.serve`
"""
