"""A prepared `filtered/` directory, as the data stage writes it, for the sweep's domain and report tests; the
Ray cluster the sweep tests share."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# (id, source, domain) per record, in two Parquet files; domains cut across the sources.
FILTERED_FILES = [[("1", "alpaca", "arithmetic"), ("2", "alpaca", "string_edit"), ("3", "alpaca", "arithmetic")],
                  [("4", "sharegpt", "arithmetic"), ("5", "sharegpt", "list_ops")]]


@pytest.fixture
def filtered(tmp_path):
    directory = tmp_path / "filtered"
    directory.mkdir()
    for i, records in enumerate(FILTERED_FILES):
        table = pa.table({
            "id": [r[0] for r in records],
            "source": [r[1] for r in records],
            "domain": [r[2] for r in records],
            "messages": [[{"role": "user", "content": f"q {r[0]}"}, {"role": "assistant", "content": f"a {r[0]}"}]
                         for r in records],
            "metadata": ["{}"] * len(records),
        })
        pq.write_table(table, directory / f"part-{i}.parquet")
    return directory


@pytest.fixture(scope="package")
def ray_cluster(local_ray_cluster):
    """One private cluster for every sweep test here (a start with its dashboard is ~10 s on 2 cores), with the
    dashboard, as `instune sweep` starts it: Ray Train's placement-group cleaner uses its state API. Never the
    default port: other clusters run on this machine."""
    from instune.ray_runtime import unused_port

    with local_ray_cluster(include_dashboard=True, dashboard_port=unused_port()):
        yield
