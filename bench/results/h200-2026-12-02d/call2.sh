bash .wheelhouse/part2/install-wheelhouse.sh > /tmp/install2.log 2>&1; echo "install2 rc $?"
