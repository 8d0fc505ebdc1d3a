# The two commands a newcomer needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow install clean tf-fixtures

# pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's local copy when present
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer train --recipe demo

# two test processes, one thread each: the tests are mostly short runs whose start-up (imports,
# DeepSpeed) is single-threaded; two torch processes of two threads each on two cores would crawl
TEST_JOBS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -x -q -n $(TEST_JOBS) --dist loadfile

test-slow: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow -n $(TEST_JOBS) --dist loadfile

# TensorFlow's own outputs that tests/test_tf_pipeline.py compares with (trainer/data/tf_pipeline.py, the lr
# schedule). TF lives in its own venv, never the project's: `make test` reads the committed fixtures.
TF_VENV ?= .venv-tf
TF_STAMP := $(TF_VENV)/.installed
SAMPLE_PHOTO = $$($(PY) -c 'import os, sklearn.datasets as d; print(os.path.join(os.path.dirname(d.__file__), "images", "china.jpg"))')

$(TF_STAMP):
	test -x $(TF_VENV)/bin/python || python3 -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TF_VENV)/bin/python -m pip install --quiet tensorflow-cpu==2.21.0
	touch $(TF_STAMP)

tf-fixtures: $(STAMP) $(TF_STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(TF_VENV)/bin/python tests/tf_fixtures/make_fixtures.py --photo "$(SAMPLE_PHOTO)"

clean:
	rm -rf $(VENV) runs
